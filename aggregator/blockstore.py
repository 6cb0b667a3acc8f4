"""The committed global sum D_v, held as wire bytes only.

A SEAL ciphertext in memory takes 64 kB per 4096 values, its wire form 50 kB; the engine needs
the wire form anyway (checkpoints, versions), so keeping both doubled the aggregator's memory at
ResNet-50 scale. ``CiphertextStore`` is the mapping the fold code commits into: reading a block
loads it from its bytes, writing one serializes it, and nothing else stays in memory.

A commit (``add_all``) can run on two cores: this thread saves each buffer ciphertext (SEAL
keeps the GIL) and the commit workers add it onto D's bytes (``ckks_pool.AddPool``), a few
batches in flight at a time, so memory stays bounded whatever the model's size.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Iterator, MutableMapping
from concurrent.futures import Future

from fedmq.shared.ckks import (
    HeVector,
    LoadedContext,
    add_inplace,
    add_to_wire,
    load_ciphertext,
    save_for_add,
    serialize,
)
from fedmq.shared.ckks_pool import AddPool
from fedmq.shared.errors import CryptoError

logger = logging.getLogger(__name__)

#: blocks per commit-worker batch, and batches in flight (~3 x 8 x 110 kB held at once)
ADD_BATCH = 8
ADD_IN_FLIGHT = 2

_Pending = list[tuple[int, bytes | None, bytes]]


class CiphertextStore(MutableMapping[int, HeVector]):
    def __init__(self, ctx: LoadedContext, data: dict[int, bytes], pool: AddPool | None = None) -> None:
        self.ctx = ctx
        #: block index -> wire bytes; shared with the engine, which checkpoints and publishes them
        self.data = data
        #: commit workers (None: every commit in this thread)
        self.pool = pool

    def add_all(self, items: Iterable[tuple[int, HeVector]]) -> None:
        """D[index] += vec for each (index, vec), in order; the vectors are the caller's (a
        buffer's, popped as it goes) and are dropped here as soon as they are saved."""
        if self.pool is None:
            for index, vec in items:
                self[index] = vec if index not in self.data else add_inplace(self[index], vec)
            return
        inflight: deque[tuple[_Pending, Future[list[bytes]] | None]] = deque()
        batch: _Pending = []
        for index, vec in items:
            batch.append((index, self.data.get(index), save_for_add(vec)))
            del vec
            if len(batch) == ADD_BATCH:
                inflight.append(self._send(batch))
                batch = []
                while len(inflight) > ADD_IN_FLIGHT:
                    self._collect(*inflight.popleft())
        if batch:
            inflight.append(self._send(batch))
        while inflight:
            self._collect(*inflight.popleft())

    def _send(self, batch: _Pending) -> tuple[_Pending, Future[list[bytes]] | None]:
        """Hand ``batch`` to the workers; None once they have failed (added here instead)."""
        if self.pool is None:
            return batch, None
        return batch, self.pool.submit([(data, saved) for _, data, saved in batch])

    def _collect(self, batch: _Pending, future: Future[list[bytes]] | None) -> None:
        try:
            sums = future.result() if future is not None else None
        except CryptoError as exc:
            # a worker that died or broke its pipe: add here (same bytes, one core) from now on
            if self.pool is not None:
                logger.warning("commit workers failed (%s); committing in the engine's thread", exc)
                pool, self.pool = self.pool, None
                pool.close()
            sums = None
        if sums is None:
            sums = [add_to_wire(self.ctx, data, saved) for _, data, saved in batch]
        for (index, _, _), wire_bytes in zip(batch, sums, strict=True):
            self.data[index] = wire_bytes

    def __getitem__(self, index: int) -> HeVector:
        # bytes this store serialized itself, or checked when the checkpoint was loaded
        return load_ciphertext(self.ctx, self.data[index], checked=True)

    def __setitem__(self, index: int, vec: HeVector) -> None:
        self.data[index] = serialize(vec)

    def __delitem__(self, index: int) -> None:
        del self.data[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def __contains__(self, index: object) -> bool:
        return index in self.data
