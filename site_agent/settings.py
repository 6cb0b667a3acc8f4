"""Site agent configuration (``FEDMQ_*`` env vars, ``.env``, or ``--config site.toml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from fedmq.shared.errors import ConfigError
from fedmq.shared.settings import FedmqSettings
from fedmq.site_agent.models import Preset, check_image_size
from fedmq.site_agent.training.device import DEVICE_PATTERN
from fedmq.site_agent.training.engines import Engine

#: the default top-k fraction, the one place it is set (the site, the reproduction, the demo and
#: the bench's wire figure read it): picked by ``fedmq experiment sparsity`` (experiments/sparsity.py)
#: as the fewest wire bytes per update within 1 validation-AUC point of dense at the
#: reproduction's FL + DP settings (docs/results.md, "Sparsity").
DEFAULT_TOPK_FRACTION = 0.5


class SiteSettings(FedmqSettings):
    #: this hospital's id: also its broker user name and its signing key's name
    site_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    #: the federation's secret CKKS context (identical at every site, never at the aggregator)
    secret_context: Path
    #: this site's private hybrid (Ed25519 + ML-DSA-65) signing key; its .pub is pinned at the aggregator
    signing_key: Path
    #: the aggregator's public signing key (``aggregator.hybrid.pub``): the site's trust anchor.
    #: Versions, snapshots and audit records not signed by it are refused.
    aggregator_public_key: Path
    #: CSV manifest of the site's images (docs/preparing-data.md)
    manifest: Path
    #: global model, residual, pending update and the privacy ledger; one process at a time; back it up
    state_dir: Path
    #: federation-wide: every site must use the same preset and seed (x_0 is built from them)
    model_preset: Preset = "small_cnn"
    #: seed of x_0; federation-wide
    init_seed: int = 0
    #: federation-wide: a torchvision or MONAI state dict mapped onto the preset as x_0 (docs/
    #: deployment.md); its SHA-256 is part of the layout fingerprint, so every site needs the same file
    init_weights: Path | None = None
    #: model input size in pixels: the preset's (site_agent/models.py) when unset, another value is
    #: refused; images are resized to it (longest side, aspect kept, zero-padded)
    image_size: int | None = Field(None, ge=8, le=1024)
    #: where training, per-sample clipping, noise and evaluation run: auto (CUDA when present), cpu, cuda, cuda:N
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    #: most images per forward/backward pass on the device (the preset's default when unset);
    #: lower it if the GPU runs out of memory, the privacy accounting does not depend on it
    max_physical_batch: PositiveInt | None = None
    #: per-sample-gradient engine: bk (fedmq's mixed ghost clipping), hooks or functorch (Opacus)
    dp_engine: Engine = "bk"
    # local training
    #: local learning rate
    lr: float = Field(0.01, gt=0)
    #: local optimizer
    optimizer: Literal["sgd", "adam"] = "sgd"
    #: SGD momentum
    momentum: float = Field(0.0, ge=0, lt=1)
    #: expected local batch size (DP: the Poisson sampling rate is batch_size / n)
    batch_size: int = Field(64, ge=1)
    #: local epochs per round
    local_epochs: int = Field(1, ge=1)
    #: DP-SGD steps per round instead of local_epochs: every site then does the same compute per
    #: round whatever its image count (FedBuff's fixed local steps); unset = local_epochs
    local_steps: int | None = Field(None, ge=1)
    #: K randomly shifted / left-right flipped views of every image per step, the image's gradient
    #: being the mean over its views, clipped once (augmentation multiplicity, De et al. 2022;
    #: site_agent/training/augment.py). 0 = none. K x the compute; no change to the privacy cost.
    #: Leave it 0 for a task that depends on left and right.
    augmentations: int = Field(0, ge=0, le=64)
    #: DP-SGD with Opacus and a privacy ledger; off only for non-private baselines
    dp_enabled: bool = True
    #: total privacy budget over planned_rounds
    target_epsilon: float = Field(1.2, gt=0)
    #: DP delta; unset: 1 / (10 n)
    target_delta: float | None = Field(None, gt=0, lt=1)
    #: per-sample gradient clipping norm
    max_grad_norm: float = Field(1.0, gt=0)
    #: updates this site plans to contribute; the DP noise is set so all of them fit the budget
    planned_rounds: int = Field(20, ge=1)
    #: research replication seed (see reproducible_noise)
    seed: int = 0
    #: derive DP sampling and noise from ``seed`` (research replication only). Off, each process
    #: draws a fresh random seed: noise from a seed an attacker may know is predictable noise.
    reproducible_noise: bool = False
    #: DP sampling and noise from ChaCha20 keyed by the OS (training/rng.py); unset means on,
    #: unless reproducible_noise asks for seeded streams
    secure_noise: bool | None = None
    # update pipeline
    #: dense: send every block; topk: the topk_fraction of blocks with the largest norm (error feedback keeps the rest)
    sparsity_mode: Literal["dense", "topk"] = "topk"
    #: fraction of blocks sent with topk
    topk_fraction: float = Field(DEFAULT_TOPK_FRACTION, gt=0, le=1)
    #: aggregator shards (docs/sharding.md): the update is split by block range, one signed
    #: sub-update per shard, and one global version is tracked per shard. Federation-wide.
    shard_count: int = Field(1, ge=1, le=1024)
    #: stretch each round's wall time by this factor (straggler experiments only)
    slowdown_factor: float = Field(1.0, ge=1.0)
    #: train again from the same global version when no newer one arrived for this long: in
    #: asynchronous mode a version may wait for other sites' updates that never come (they are
    #: done or down), and a site that only waited would stall the federation.
    retrain_after_s: float = Field(60.0, gt=0)
    #: asynchronous (FedBuff) federations: start the next round as soon as the last update is
    #: published, from the newest version held, as FedBuff's clients do. Otherwise a fast site
    #: idles until a version commits, and a version of K updates then waits for the slowest
    #: site whenever the fast ones are fewer than K: async runs at the straggler's pace, like
    #: sync. Each round still spends budget from the ledger (planned_rounds bounds them). Leave
    #: it off in sync mode: the aggregator refuses a second update on the same round.
    train_continuously: bool = False
    #: tqdm progress bars on a terminal (services: off; see progress_every_steps)
    progress_bars: bool = True
    #: prometheus port for the site's refusal counters (fedmq_site_versions_refused_total); 0 = off
    metrics_port: int = Field(0, ge=0, le=65535)
    # --- first day safety (docs/preparing-data.md, docs/deployment.md) -------------------
    #: a site with no state asks the aggregator whether its id already contributed and which
    #: version to start from, and trains only after the answer (a snapshot, or "no version yet"
    #: at version 0); it asks again every join_wait_s. An id known without its ledger is
    #: refused. 0 = do not ask (the site starts from x_0 at once).
    join_wait_s: float = Field(5.0, ge=0)
    #: start although the aggregator knows this site id and the state directory is empty: only
    #: for joining a *new* federation (new aggregator state). Never to "reset" a lost ledger.
    join_new_federation: bool = False
    #: pause contributing when the validation loss exceeds this multiple of the best seen
    divergence_loss_factor: float = Field(10.0, gt=1)
    #: ... or when the AUC stays at 0.5 for this many consecutive global versions
    divergence_flat_auc_versions: int = Field(5, ge=1)
    #: refuse to train when more than this fraction of the manifest's rows cannot be read
    max_unreadable_fraction: float = Field(0.05, ge=0, le=1)
    #: DICOM Modality values this site's task expects (chest radiographs: CR, DX); a DICOM of
    #: another modality (a CT or MR slice in the folder) is skipped and reported. Empty = any.
    expected_modalities: list[str] = ["CR", "DX", "RG"]
    #: log a progress line every this many optimizer steps during a round (0 = off)
    progress_every_steps: int = Field(50, ge=0)
    #: manifest split trained on
    train_split: Literal["train"] = "train"
    #: manifest split every global version is evaluated on (and the divergence guard watches)
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
