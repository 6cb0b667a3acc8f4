"""Turn a plaintext model delta into signed, encrypted, chunked update messages.

This is the last step at which plaintext exists: everything it returns is ciphertext plus
the header fields the aggregator needs to validate and weight the update.

Sharded aggregation (docs/sharding.md): with ``shard_count`` n > 1 the update is sparsified
once over the whole model (so top-k and error feedback are exactly as with one shard) and the
kept blocks are split by owner, shard i owning blocks ``b * n // total_blocks == i``. Each
shard gets its own signed chunk set (``update_id`` ``<site>:<seq>:s<i>``, ``base_version`` =
the site's version of that shard, ``shard_index``/``shard_count`` in the header), even when it
holds no block, so every shard counts every update (K and sync rounds stay aligned).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

from shared.chunking import chunk_blocks
from shared.ckks import LoadedContext
from shared.ckks_pool import encrypt_blocks_parallel
from shared.schema import EncryptedBlock, UpdateChunk
from shared.sharding import block_shard
from shared.signing import SigningKey, sign_chunk
from shared.sparsify import SparsityMode, sparsify
from shared.update_ids import shard_update_id
from shared.update_ids import update_id as make_update_id


def shard_of_encoded(raw: bytes) -> int:
    """The ``shard_index`` of an encoded update chunk (0 when absent), for publish routing.

    Only the header is looked at; the aggregator does the full validation."""
    head = msgpack.unpackb(raw, raw=False)
    value = head.get("shard_index", 0) if isinstance(head, dict) else 0
    return value if isinstance(value, int) and value >= 0 else 0


@dataclass(frozen=True)
class UpdateIdentity:
    site_id: str
    seq: int
    base_version: int
    sample_weight: float

    @property
    def update_id(self) -> str:
        return make_update_id(self.site_id, self.seq)


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
    signing_key: SigningKey,
    *,
    mode: SparsityMode = "topk",
    fraction: float = 0.5,
    max_message_bytes: int,
    shard_count: int | None = None,
    shard_base_versions: Sequence[int] | None = None,
    encrypt_workers: int | None = None,
) -> BuiltUpdate:
    """Sparsify, encrypt, chunk and sign one update.

    ``shard_count`` (default: the length of ``shard_base_versions``, else 1) splits it per
    aggregator shard; ``shard_base_versions`` (default: ``identity.base_version`` for every
    shard) are the site's versions of each shard. The returned chunks are ordered by shard, then chunk index.
    ``encrypt_workers`` (default: every core) encrypts large updates in worker processes.
    """
    n = shard_count if shard_count is not None else (len(shard_base_versions) if shard_base_versions else 1)
    if shard_base_versions is None:
        shard_base_versions = [int(identity.base_version)] * n
    if len(shard_base_versions) != n or n < 1:
        raise ValueError(f"need one base version per shard ({n}), got {len(shard_base_versions)}")
    block_size = ctx.block_size
    sparse, new_residual = sparsify(delta, residual, block_size, mode, fraction)
    t0 = time.perf_counter()
    ciphertexts = encrypt_blocks_parallel(ctx, sparse.blocks, workers=encrypt_workers)
    blocks = [
        EncryptedBlock(index=idx, ciphertext=ct) for idx, ct in zip(sparse.indices, ciphertexts, strict=True)
    ]
    encrypt_seconds = time.perf_counter() - t0
    total = sparse.total_blocks
    if n > total:
        raise ValueError(f"{n} shards but only {total} blocks")
    created_at = time.time()
    chunks: list[UpdateChunk] = []
    for shard in range(n):
        mine = [b for b in blocks if block_shard(b.index, total, n) == shard] if n > 1 else blocks
        template = UpdateChunk(
            chunk_index=0,
            chunk_count=1,
            block_size=block_size,
            total_blocks=total,
            block_indices=tuple(b.index for b in mine),
            blocks=(),
            key_fingerprint=ctx.fingerprint,
            layout_fingerprint=layout_fingerprint,
            shard_index=shard,
            shard_count=n,
            site_id=identity.site_id,
            update_id=shard_update_id(identity.update_id, shard, n),
            seq=identity.seq,
            base_version=int(shard_base_versions[shard]),
            sample_weight=float(identity.sample_weight),
            sparsity_mode=mode,
            sparsity_fraction=1.0 if mode == "dense" else float(fraction),
            created_at=created_at,
        )
        chunks += [sign_chunk(c, signing_key) for c in chunk_blocks(template, mine, max_message_bytes)]
    return BuiltUpdate(chunks, new_residual, sparse.indices, encrypt_seconds)
