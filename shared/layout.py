"""Model layout: a torch ``state_dict`` <-> one flat float vector, and its fingerprint.

Sites and the aggregator agree on block indices only through this flattening, so an update
made for another architecture (or another parameter order) must be refused, never summed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from fedmq.shared.errors import LayoutMismatch

LAYOUT_SCHEMA_VERSION = 1


class TensorEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    numel: int


class ModelLayout(BaseModel):
    """The manifest: names, shapes, dtypes and offsets of every floating-point tensor."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = LAYOUT_SCHEMA_VERSION
    model_id: str
    entries: tuple[TensorEntry, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], model_id: str) -> "ModelLayout":
        entries, offset = [], 0
        for name, tensor in state.items():
            if not torch.is_floating_point(tensor):
                raise ValueError(f"{name}: non-float tensor ({tensor.dtype}) cannot be federated")
            n = int(tensor.numel())
            entries.append(TensorEntry(name=name, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."), offset=offset, numel=n))
            offset += n
        return cls(model_id=model_id, entries=tuple(entries))

    @property
    def size(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """float64 vector (CKKS encodes doubles; float32 would add a needless rounding)."""
        if list(state.keys()) != [e.name for e in self.entries]:
            raise LayoutMismatch("state_dict keys differ from the model layout")
        out = np.empty(self.size, dtype=np.float64)
        for e in self.entries:
            t = state[e.name]
            if tuple(t.shape) != e.shape:
                raise LayoutMismatch(f"{e.name}: shape {tuple(t.shape)} != layout {e.shape}")
            out[e.offset : e.offset + e.numel] = t.detach().cpu().double().reshape(-1).numpy()
        return out

    def unflatten(self, vector: np.ndarray) -> dict[str, torch.Tensor]:
        if vector.shape != (self.size,):
            raise LayoutMismatch(f"vector of {vector.shape} for a layout of {self.size} values")
        return {
            e.name: torch.from_numpy(np.ascontiguousarray(vector[e.offset : e.offset + e.numel]))
            .to(getattr(torch, e.dtype))
            .reshape(e.shape)
            for e in self.entries
        }

    def check(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            raise LayoutMismatch(f"layout fingerprint {fingerprint!r} != ours {self.fingerprint!r}")
