"""Block top-k sparsification with error feedback.

The flat update is cut into ciphertext-sized blocks. Only the blocks with the largest L2
norm are encrypted and sent; the rest stays in a residual that is added to the next update,
so nothing a site learned is dropped, only delayed (Seide et al. 2014; Stich et al. 2018).

What block indices reveal: the aggregator and the broker see, in plaintext, *which* blocks a
site sent. With a layout manifest that maps blocks to layers, that tells which layers moved
most in that round. It does not reveal values, signs or magnitudes. Dense mode sends every
block and reveals nothing beyond the model size. See docs/threat-model.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

SparsityMode = Literal["dense", "topk"]


def n_blocks(size: int, block_size: int) -> int:
    return max(1, math.ceil(size / block_size))


def block_view(vector: np.ndarray, block_size: int) -> np.ndarray:
    """The vector zero-padded and reshaped to (n_blocks, block_size)."""
    nb = n_blocks(vector.size, block_size)
    padded = np.zeros(nb * block_size, dtype=np.float64)
    padded[: vector.size] = vector
    return padded.reshape(nb, block_size)


@dataclass(frozen=True)
class SparseUpdate:
    indices: tuple[int, ...]
    blocks: np.ndarray  # (len(indices), block_size)
    total_blocks: int


def blocks_to_keep(total: int, mode: SparsityMode, fraction: float) -> int:
    if mode == "dense":
        return total
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"top-k fraction must lie in (0, 1], got {fraction}")
    # round first: 0.1 * 30 is 3.0000000000000004 in binary floating point, and means 3
    return max(1, math.ceil(round(fraction * total, 9)))


def sparsify(
    delta: np.ndarray,
    residual: np.ndarray | None,
    block_size: int,
    mode: SparsityMode = "topk",
    fraction: float = 0.5,
) -> tuple[SparseUpdate, np.ndarray]:
    """Return the blocks to send and the new residual (same length as ``delta``)."""
    if residual is not None and residual.shape != delta.shape:
        raise ValueError("residual does not match the update's shape")
    # delta + residual, written once into the zero-padded block array (a ResNet-50 update is
    # 188 MB in float64: every full copy costs a tenth of a second)
    blocks = np.zeros((n_blocks(delta.size, block_size), block_size), dtype=np.float64)
    flat = blocks.reshape(-1)[: delta.size]
    flat[:] = delta
    if residual is not None:
        flat += residual
    keep = blocks_to_keep(blocks.shape[0], mode, fraction)
    if keep == blocks.shape[0]:  # dense: every block goes, nothing stays behind
        return SparseUpdate(tuple(range(keep)), blocks, keep), np.zeros(delta.size, dtype=np.float64)
    norms = np.linalg.norm(blocks, axis=1)
    # Stable order: ties broken by index so every run picks the same blocks.
    order = np.lexsort((np.arange(len(norms)), -norms))[:keep]
    chosen = np.sort(order)
    new_residual_blocks = blocks.copy()
    new_residual_blocks[chosen] = 0.0
    new_residual = new_residual_blocks.reshape(-1)[: delta.size].copy()
    return SparseUpdate(tuple(int(i) for i in chosen), blocks[chosen].copy(), blocks.shape[0]), new_residual


def densify(indices: list[int] | tuple[int, ...], blocks: np.ndarray, size: int, block_size: int) -> np.ndarray:
    """Inverse of :func:`sparsify`'s selection; an unsent block counts as zero."""
    out = np.zeros(n_blocks(size, block_size) * block_size, dtype=np.float64)
    for i, idx in enumerate(indices):
        out[idx * block_size : (idx + 1) * block_size] = blocks[i]
    return out[:size]
