"""Site agent configuration (``FEDMQ_*`` env vars, ``.env``, or ``--config site.toml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from shared.errors import ConfigError
from shared.settings import FedmqSettings
from site_agent.models import Preset, check_image_size
from site_agent.training.device import DEVICE_PATTERN
from site_agent.training.engines import Engine


class SiteSettings(FedmqSettings):
    site_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    secret_context: Path
    signing_key: Path
    manifest: Path
    state_dir: Path
    #: federation-wide: every site must use the same preset and seed (x_0 is built from them)
    model_preset: Preset = "small_cnn"
    init_seed: int = 0
    #: federation-wide: a torchvision or MONAI state dict mapped onto the preset as x_0 (docs/
    #: deployment.md); its SHA-256 is part of the layout fingerprint, so every site needs the same file
    init_weights: Path | None = None
    #: the preset's input size (site_agent/models.py) when unset; another value is refused
    image_size: int | None = Field(None, ge=8, le=1024)
    #: where training, per-sample clipping, noise and evaluation run: auto (CUDA when present), cpu, cuda, cuda:N
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    #: most images per forward/backward pass on the device (the preset's default when unset);
    #: lower it if the GPU runs out of memory, the privacy accounting does not depend on it
    max_physical_batch: PositiveInt | None = None
    #: per-sample-gradient engine: bk (fedmq's mixed ghost clipping), hooks or functorch (Opacus)
    dp_engine: Engine = "bk"
    # local training
    lr: float = Field(0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.0, ge=0, lt=1)
    batch_size: int = Field(64, ge=1)
    local_epochs: int = Field(1, ge=1)
    dp_enabled: bool = True
    target_epsilon: float = Field(1.2, gt=0)
    target_delta: float | None = Field(None, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    #: updates this site plans to contribute; the DP noise is set so all of them fit the budget
    planned_rounds: int = Field(20, ge=1)
    seed: int = 0
    #: derive DP sampling and noise from ``seed`` (research replication only). Off, each process
    #: draws a fresh random seed: noise from a seed an attacker may know is predictable noise.
    reproducible_noise: bool = False
    #: DP sampling and noise from ChaCha20 keyed by the OS (training/rng.py); unset means on,
    #: unless reproducible_noise asks for seeded streams
    secure_noise: bool | None = None
    # update pipeline
    sparsity_mode: Literal["dense", "topk"] = "topk"
    topk_fraction: float = Field(0.5, gt=0, le=1)
    #: aggregator shards (docs/sharding.md): the update is split by block range, one signed
    #: sub-update per shard, and one global version is tracked per shard. Federation-wide.
    shard_count: int = Field(1, ge=1, le=1024)
    #: stretch each round's wall time by this factor (straggler experiments only)
    slowdown_factor: float = Field(1.0, ge=1.0)
    #: train again from the same global version when no newer one arrived for this long: in
    #: asynchronous mode a version may wait for other sites' updates that never come (they are
    #: done or down), and a site that only waited would stall the federation.
    retrain_after_s: float = Field(60.0, gt=0)
    progress_bars: bool = True
    train_split: Literal["train"] = "train"
    val_split: Literal["val"] = "val"

    @model_validator(mode="after")
    def _resolve(self) -> "SiteSettings":
        try:
            self.image_size = check_image_size(self.model_preset, self.image_size)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.secure_noise is None:
            self.secure_noise = not self.reproducible_noise
        elif self.secure_noise and self.reproducible_noise:
            raise ValueError("reproducible_noise = true needs secure_noise = false (a secure generator cannot be replayed)")
        return self
