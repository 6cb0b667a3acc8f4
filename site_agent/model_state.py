"""The federation's model: preset + init seed -> x_0, its layout, and x_v from D_v.

Every key holder (site agents, the study's evaluator) builds x_0 the same way, so the
layout fingerprint names the init seed too: a party with another seed is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fedmq.shared.layout import ModelLayout
from fedmq.site_agent.models import build_model, file_digest, load_init_weights


@dataclass
class FederatedModel:
    preset: str
    init_seed: int
    layout: ModelLayout
    x0: np.ndarray

    @classmethod
    def create(cls, preset: str, init_seed: int, init_weights: Path | str | None = None) -> "FederatedModel":
        """x_0 from the seed, or from ``init_weights`` mapped onto the preset (the seed fills what
        the file does not cover). The file's SHA-256 goes into the model id, hence into the layout
        fingerprint: a site that started from other weights is refused like another architecture."""
        model = build_model(preset, init_seed)  # type: ignore[arg-type]
        model_id = f"{preset}/init-seed-{init_seed}"
        if init_weights is not None:
            load_init_weights(model, init_weights, preset)
            model_id += f"/init-weights-sha256-{file_digest(Path(init_weights))[:32]}"
        layout = ModelLayout.from_state_dict(model.state_dict(), model_id=model_id)
        return cls(preset, init_seed, layout, layout.flatten(model.state_dict()))

    def to_module(self, vector: np.ndarray) -> nn.Module:
        model = build_model(self.preset, self.init_seed)  # type: ignore[arg-type]
        model.load_state_dict(self.layout.unflatten(vector))
        return model

    def vector_of(self, model: nn.Module) -> np.ndarray:
        return self.layout.flatten({k: v for k, v in model.state_dict().items()})


def identify_layout(fingerprint: str, init_seed: int) -> str | None:
    """Which preset (with ``init_seed``) has this layout fingerprint: used only to name, in an
    error, the model the federation trains when it is not ours. Builds each preset once."""
    from fedmq.site_agent.models import PRESETS

    for preset in PRESETS:
        try:
            if FederatedModel.create(preset, init_seed).layout.fingerprint == fingerprint:
                return preset
        except Exception:  # noqa: BLE001 - a preset that cannot be built here cannot be the answer
            continue
    return None


def describe_layout_mismatch(theirs: str, preset: str, init_seed: int, ours: str, where: str) -> str:
    other = identify_layout(theirs, init_seed)
    named = f"preset {other!r} with init_seed {init_seed}" if other else "another preset or init_seed"
    return (f"{where} uses model layout {theirs} ({named}); this site uses preset {preset!r} with init_seed "
            f"{init_seed} (layout {ours}). model_preset and init_seed must be the same at every site: "
            f"every round trained here would be refused")


def model_vector(x0: np.ndarray, global_sum: np.ndarray, value_scale: float) -> np.ndarray:
    if global_sum.size == 0 or value_scale == 0.0:
        return x0.copy()
    return x0 + value_scale * global_sum[: x0.size]


__all__ = ["FederatedModel", "describe_layout_mismatch", "identify_layout", "model_vector"]
