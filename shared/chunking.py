"""Split an encrypted message into chunks under the size limit, and put them back together.

A chunk is self-describing (header + some blocks), so a receiver can check every piece
against the first one it saw and tell duplicates, gaps and tampering apart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from fedmq.shared.codec import encode
from fedmq.shared.errors import DuplicateChunk, InconsistentChunk, MessageTooLarge, MissingChunk
from fedmq.shared.schema import ChunkedMessage, EncryptedBlock

C = TypeVar("C", bound=ChunkedMessage)

#: msgpack framing per block (map header, keys, bin header) plus the signature, rounded up.
_PER_BLOCK_OVERHEAD = 48
#: header framing, plus room for the hybrid Ed25519 + ML-DSA-65 signature (shared.signing,
#: at most 4 KiB) that is added after chunking
_HEADER_MARGIN = 256 + 4096
_PER_CHUNK_EXCLUDED = {"chunk_index", "blocks", "signature"}


def chunk_blocks(
    template: C,
    blocks: Sequence[EncryptedBlock],
    max_message_bytes: int,
) -> list[C]:
    """Copies of ``template`` (chunk fields ignored) holding the blocks, each under the limit."""
    indices = tuple(sorted(b.index for b in blocks))
    base = template.model_copy(update={"block_indices": indices, "blocks": (), "chunk_index": 0, "chunk_count": 1})
    header = len(encode(base)) + _HEADER_MARGIN
    budget = max_message_bytes - header
    groups: list[list[EncryptedBlock]] = [[]]
    used = 0
    for block in sorted(blocks, key=lambda b: b.index):
        cost = len(block.ciphertext) + _PER_BLOCK_OVERHEAD
        if cost > budget:
            raise MessageTooLarge(f"one block ({cost} bytes) cannot fit a {max_message_bytes}-byte message")
        if used + cost > budget and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(block)
        used += cost
    n = len(groups)
    return [
        base.model_copy(update={"chunk_index": i, "chunk_count": n, "blocks": tuple(g)})
        for i, g in enumerate(groups)
    ]


def header_room(template: C, block_indices: Sequence[int], largest_block: int, max_message_bytes: int) -> int:
    """Bytes a message built from ``template`` for ``block_indices`` can still give to header
    fields of variable size (a snapshot's audit records) while its largest block, ``largest_block``
    bytes of ciphertext, still fits beside them in one message. Negative: not even the block fits."""
    base = template.model_copy(update={"block_indices": tuple(sorted(block_indices)), "blocks": (),
                                       "chunk_index": 0, "chunk_count": 1})
    return max_message_bytes - (len(encode(base)) + _HEADER_MARGIN) - (largest_block + _PER_BLOCK_OVERHEAD)


def header_of(chunk: ChunkedMessage) -> dict:
    return chunk.model_dump(exclude=_PER_CHUNK_EXCLUDED)


@dataclass
class _Pending(Generic[C]):
    first: C
    header: dict
    chunks: dict[int, C] = field(default_factory=dict)
    seen_blocks: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    nbytes: int = 0


@dataclass(frozen=True)
class Assembled(Generic[C]):
    header: C  # chunk 0, for its header fields
    blocks: tuple[EncryptedBlock, ...]  # every block, sorted by index
    chunks: tuple[C, ...]


class ChunkAssembler(Generic[C]):
    """Collects chunks per message key until complete; bounded in count and bytes."""

    def __init__(self, key: Callable[[C], str], max_pending: int = 256, max_pending_bytes: int = 512 << 20) -> None:
        self._key = key
        self._pending: dict[str, _Pending[C]] = {}
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._pending)

    def pending_keys(self) -> list[str]:
        return list(self._pending)

    def add(self, chunk: C, nbytes: int = 0) -> Assembled[C] | None:
        k = self._key(chunk)
        entry = self._pending.get(k)
        if entry is None:
            if len(self._pending) >= self.max_pending or self._bytes + nbytes > self.max_pending_bytes:
                raise MissingChunk(f"too many incomplete messages pending; refusing {k}")
            entry = self._pending[k] = _Pending(first=chunk, header=header_of(chunk))
        else:
            if header_of(chunk) != entry.header:
                raise InconsistentChunk(f"{k}: chunk {chunk.chunk_index} header differs from earlier chunks")
            if chunk.chunk_index in entry.chunks:
                raise DuplicateChunk(f"{k}: chunk {chunk.chunk_index} received twice")
        declared = set(chunk.block_indices)
        for b in chunk.blocks:
            if b.index not in declared or b.index in entry.seen_blocks:
                if not entry.chunks:  # a bad first chunk must not leave an empty entry behind
                    self.discard(k)
                raise InconsistentChunk(f"{k}: block {b.index} undeclared or repeated")
        entry.chunks[chunk.chunk_index] = chunk
        entry.seen_blocks.update(b.index for b in chunk.blocks)
        entry.nbytes += nbytes
        self._bytes += nbytes
        if len(entry.chunks) < chunk.chunk_count:
            return None
        self.discard(k)
        if entry.seen_blocks != declared:
            raise InconsistentChunk(f"{k}: blocks received differ from the declared set")
        ordered = tuple(entry.chunks[i] for i in range(chunk.chunk_count))
        blocks = tuple(sorted((b for c in ordered for b in c.blocks), key=lambda b: b.index))
        return Assembled(ordered[0], blocks, ordered)

    def discard(self, key: str) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes

    def expire(self, older_than_s: float, now: float | None = None) -> list[tuple[str, MissingChunk]]:
        """Drop messages whose chunks stopped coming; each returned with its error."""
        now = time.monotonic() if now is None else now
        out = []
        for k, entry in list(self._pending.items()):
            if now - entry.started > older_than_s:
                missing = sorted(set(range(entry.first.chunk_count)) - set(entry.chunks))
                out.append((k, MissingChunk(f"{k}: chunks {missing} never arrived")))
                self.discard(k)
        return out
