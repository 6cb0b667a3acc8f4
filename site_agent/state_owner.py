"""The one owner of a site's mutable state (``SiteState``), with the one lock that guards it.

Three threads touch a site's state: the connection thread applies global versions
(``GlobalModelReceiver``) and publishes pending updates (``SiteAgent``); the training worker
reads the global model and residual and records the update it built (``SiteRuntime``). Before
this module, the receiver wrote ``SiteState`` fields without the runtime's lock while the worker
read them, so a version applied mid-round could tear the model a round trained from.

Rules: nobody holds a ``SiteState`` except this object. Readers get a consistent copy
(:meth:`view`, :meth:`model_sum`, :meth:`residual`); writers go through a method (one
transaction under the lock, persisted where the method says so). The slow parts (decrypting a
version, training, encrypting) run outside the lock; only the hand-over runs under it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from fedmq.site_agent.state import SiteState, SiteStateStore


@dataclass(frozen=True)
class StateView:
    """A consistent, read-only copy of the scalar fields of a site's state."""

    site_id: str
    version: int
    next_seq: int
    updates_sent: int
    bytes_sent: int
    last_trained_base: int
    generation: int
    value_scale: float
    pending: tuple[bytes, ...] | None
    pending_seq: int | None
    shard_versions: tuple[int, ...] | None


class SiteStateOwner:
    def __init__(self, state: SiteState, store: SiteStateStore | None = None) -> None:
        self._state = state
        self._store = store
        self._lock = threading.RLock()

    # -- reads (copies) -------------------------------------------------------------------
    def view(self) -> StateView:
        with self._lock:
            s = self._state
            return StateView(
                site_id=s.site_id, version=s.version, next_seq=s.next_seq, updates_sent=s.updates_sent,
                bytes_sent=s.bytes_sent, last_trained_base=s.last_trained_base, generation=s.generation,
                value_scale=s.value_scale, pending=tuple(s.pending) if s.pending is not None else None,
                pending_seq=s.pending_seq, shard_versions=tuple(s.shard_versions) if s.shard_versions is not None else None,
            )

    def model_sum(self) -> tuple[np.ndarray, float]:
        """(D_v, value_scale) of the version held, copied together so they belong to one version."""
        with self._lock:
            return self._state.global_sum.copy(), self._state.value_scale

    def training_base(self) -> tuple[np.ndarray, float, StateView]:
        """(D_v, value_scale, view) read together: the model a round trains from and the version
        (and shard versions) its update will name can never come from two different versions."""
        with self._lock:
            return self._state.global_sum.copy(), self._state.value_scale, self.view()

    def residual(self) -> np.ndarray | None:
        with self._lock:
            r = self._state.residual
            return None if r is None else r.copy()

    # -- writes ---------------------------------------------------------------------------
    @contextmanager
    def edit(self) -> Iterator[SiteState]:
        """The state itself, under the lock, for a short in-memory change (the receiver's
        hand-over of a decrypted version). Nothing slow inside; no reference kept outside."""
        with self._lock:
            yield self._state

    def save(self) -> None:
        """Persists the current state (atomic files, ``state.json`` last)."""
        if self._store is None:
            return
        with self._lock:
            self._store.save(self._state)

    def record_built(self, *, residual: np.ndarray | None, pending: list[bytes], seq: int, base_version: int) -> None:
        """A built, encrypted update becomes pending (persisted before anything is published)."""
        with self._lock:
            s = self._state
            s.residual, s.pending, s.pending_seq = residual, list(pending), seq
            s.next_seq = seq + 1
            s.last_trained_base = base_version
            self.save()

    def mark_published(self) -> None:
        """The pending update was confirmed by the broker: count it, forget its bytes, persist."""
        with self._lock:
            s = self._state
            sent = sum(map(len, s.pending or []))
            s.pending, s.pending_seq = None, None
            s.updates_sent += 1
            s.bytes_sent += sent
            self.save()


__all__ = ["SiteStateOwner", "StateView"]
