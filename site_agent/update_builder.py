"""Turn a plaintext model delta into signed, encrypted, chunked update messages.

This is the last step at which plaintext exists: everything it returns is ciphertext plus
the header fields the aggregator needs to validate and weight the update.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.chunking import chunk_blocks
from shared.ckks import LoadedContext, encrypt_block
from shared.schema import EncryptedBlock, UpdateChunk
from shared.signing import sign_chunk
from shared.sparsify import SparsityMode, sparsify


@dataclass(frozen=True)
class UpdateIdentity:
    site_id: str
    seq: int
    base_version: int
    sample_weight: float

    @property
    def update_id(self) -> str:
        return f"{self.site_id}:{self.seq}"


@dataclass(frozen=True)
class BuiltUpdate:
    chunks: list[UpdateChunk]
    residual: np.ndarray
    sent_indices: tuple[int, ...]
    encrypt_seconds: float


def build_update(
    delta: np.ndarray,
    residual: np.ndarray | None,
    identity: UpdateIdentity,
    ctx: LoadedContext,
    layout_fingerprint: str,
    signing_key: Ed25519PrivateKey,
    *,
    mode: SparsityMode = "topk",
    fraction: float = 0.5,
    max_message_bytes: int,
) -> BuiltUpdate:
    block_size = ctx.preset.slots
    sparse, new_residual = sparsify(delta, residual, block_size, mode, fraction)
    t0 = time.perf_counter()
    blocks = [
        EncryptedBlock(index=idx, ciphertext=encrypt_block(ctx, values))
        for idx, values in zip(sparse.indices, sparse.blocks, strict=True)
    ]
    encrypt_seconds = time.perf_counter() - t0
    template = UpdateChunk(
        chunk_index=0,
        chunk_count=1,
        block_size=block_size,
        total_blocks=sparse.total_blocks,
        block_indices=sparse.indices,
        blocks=(),
        key_fingerprint=ctx.fingerprint,
        layout_fingerprint=layout_fingerprint,
        site_id=identity.site_id,
        update_id=identity.update_id,
        seq=identity.seq,
        base_version=identity.base_version,
        sample_weight=float(identity.sample_weight),
        sparsity_mode=mode,
        sparsity_fraction=1.0 if mode == "dense" else float(fraction),
        created_at=time.time(),
    )
    chunks = [sign_chunk(c, signing_key) for c in chunk_blocks(template, blocks, max_message_bytes)]
    return BuiltUpdate(chunks, new_residual, sparse.indices, encrypt_seconds)
