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

from fedmq.shared.chunking import chunk_blocks
from fedmq.shared.ckks import LoadedContext
from fedmq.shared.ckks_pool import iter_encrypt_blocks
from fedmq.shared.errors import CryptoError
from fedmq.shared.schema import EncryptedBlock, UpdateChunk
from fedmq.shared.sharding import block_shard
from fedmq.shared.signing import SigningKey, sign_chunk
from fedmq.shared.sparsify import SparsityMode, sparsify
from fedmq.shared.update_ids import shard_update_id
from fedmq.shared.update_ids import update_id as make_update_id


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
    #: from the first block sent to be encrypted to the last ciphertext back (the first
    #: chunks are signed meanwhile, while later blocks are still being encrypted)
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
    total = sparse.total_blocks
    if n > total:
        raise ValueError(f"{n} shards but only {total} blocks")
    # the workers start now and encrypt while this thread lays out the chunks
    t0 = time.perf_counter()
    batches = iter_encrypt_blocks(ctx, sparse.blocks, workers=encrypt_workers)
    # Chunk first, with stand-ins of the ciphertexts' size (every fresh ciphertext has exactly
    # ``seeded_bytes``), then fill and sign each chunk as soon as its ciphertexts arrive: on a
    # large update the signing overlaps the workers' encryption instead of following it.
    stand_in = bytes(ctx.preset.seeded_bytes)
    created_at = time.time()
    layouts: list[UpdateChunk] = []
    for shard in range(n):
        mine = [i for i in sparse.indices if block_shard(i, total, n) == shard] if n > 1 else list(sparse.indices)
        template = UpdateChunk(
            chunk_index=0,
            chunk_count=1,
            block_size=block_size,
            total_blocks=total,
            block_indices=tuple(mine),
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
        stand_ins = [EncryptedBlock.model_construct(index=i, ciphertext=stand_in) for i in mine]
        layouts += chunk_blocks(template, stand_ins, max_message_bytes)
    # shards own ascending index ranges and chunks hold ascending indices, so the layouts'
    # blocks, in order, are ``sparse.indices``: the order the ciphertexts arrive in
    arriving = (ct for batch in batches for ct in batch)
    chunks: list[UpdateChunk] = []
    encrypt_seconds = time.perf_counter() - t0
    for layout in layouts:
        blocks = []
        for placeholder in layout.blocks:
            ct = next(arriving, None)
            if ct is None or len(ct) != len(stand_in):
                raise CryptoError("encryption returned fewer ciphertexts, or other sizes, than blocks")
            blocks.append(EncryptedBlock(index=placeholder.index, ciphertext=ct))
        encrypt_seconds = time.perf_counter() - t0
        chunks.append(sign_chunk(layout.model_copy(update={"blocks": tuple(blocks)}), signing_key))
    if next(arriving, None) is not None:
        raise CryptoError("encryption returned more ciphertexts than blocks")
    return BuiltUpdate(chunks, new_residual, sparse.indices, encrypt_seconds)
