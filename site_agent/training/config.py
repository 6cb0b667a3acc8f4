"""Validated training settings; a site refuses nonsense (negative lr, delta > 1/n) before touching data."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from fedmq.site_agent.models import PRESETS, Preset
from fedmq.site_agent.training.device import DEVICE_PATTERN
from fedmq.site_agent.training.engines import Engine


class DPConfig(BaseModel):
    """DP-SGD settings; the budget covers every round the site plans to contribute, not one round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    target_epsilon: PositiveFloat = 8.0
    delta: float | None = Field(default=None, gt=0.0, lt=1.0)
    max_grad_norm: PositiveFloat = 1.0
    planned_rounds: PositiveInt = 10
    #: per-sample-gradient engine (site_agent/training/engines.py; default chosen by measurement,
    #: docs/architecture.md)
    engine: Engine = "bk"
    #: Poisson sampling and Gaussian noise from ChaCha20 keyed by the OS (training/rng.py) instead
    #: of a seeded torch generator; ``fedmq site run`` turns it on unless reproducible_noise is set
    secure_noise: bool = False

    def resolve_delta(self, n_samples: int) -> float:
        """Default delta 1/(10 n); an explicit one must not exceed 1/n, beyond which DP is meaningless."""
        if n_samples < 1:
            raise ValueError("cannot resolve delta for an empty dataset")
        if self.delta is None:
            return 1.0 / (10.0 * n_samples)
        if self.delta > 1.0 / n_samples:
            raise ValueError(f"delta {self.delta:g} exceeds 1/n = {1.0 / n_samples:g} for n = {n_samples}")
        return self.delta


class TrainingConfig(BaseModel):
    """One round of local training; ``local_steps`` (if set) overrides ``local_epochs``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: Preset = "small_cnn"
    lr: PositiveFloat = 0.05
    batch_size: PositiveInt = 64
    local_epochs: PositiveInt = 1
    local_steps: PositiveInt | None = None
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    pos_weight: PositiveFloat | None = None
    #: K randomly shifted / flipped views of every example per step, an example's gradient being
    #: the mean over its views (augmentation multiplicity; training/augment.py says why). 0: the
    #: images as they are. Costs K x the compute of a step; changes nothing in the privacy analysis.
    augmentations: int = Field(default=0, ge=0, le=64)
    dp: DPConfig = Field(default_factory=DPConfig)
    seed: int = 0
    #: auto (CUDA when present), cpu, cuda, cuda:N; see training/device.py
    device: str = Field(default="auto", pattern=DEVICE_PATTERN)
    #: most images per forward/backward pass; a larger (Poisson) logical batch is split into
    #: micro-batches of this size, with the same clipped-and-noised gradient. None: the preset's.
    max_physical_batch: PositiveInt | None = None

    def physical_batch(self) -> int:
        return self.max_physical_batch or PRESETS[self.model].physical_batch

    def steps_per_round(self, n_samples: int) -> int:
        """Fixed per round so the privacy cost of every round is known before it starts."""
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * max(1, math.ceil(n_samples / self.batch_size))

    def sample_rate(self, n_samples: int) -> float:
        """Poisson sampling rate q = B / n (capped at 1 for tiny sites)."""
        if n_samples < 1:
            raise ValueError("cannot train on an empty dataset")
        return min(1.0, self.batch_size / n_samples)
