"""The aggregator service: one broker link, three queues, the engine, reconnects.

The link comes from the transport seam (``broker.transport``): pika in production, the
in-memory ``StubBroker`` in fast tests; reconnects go through ``run_reconnecting``, the loop
every fedmq service shares.

Threading: two threads, so that checking a chunk never waits for a fold and the other way round.

- The **connection thread** owns the link: it reads deliveries, runs the validator's first stage
  on each update chunk (``engine.precheck``: decode, hybrid signature over a SHA-512 of up to
  4 MB, every ciphertext's checksum; hashing releases the GIL), and runs what the engine thread
  asks of the link (dead-letter copies, acks, publishes) in the order asked.
- The **engine thread** owns the engine: every update chunk, in delivery order, goes through
  ``accept`` (the rest of the checks; the WAL record written, not yet fsynced) and ``apply``
  (deserialize, fold, commit), so each chunk's checks see every earlier chunk's fold, as
  before. **Group commit**: while further chunks wait (at most ``GROUP_COMMIT_MAX``), their
  acks wait too; then one fsync makes the batch durable, and only then are its dead-letter
  copies, acks and outputs (versions, notices) asked of the link. Snapshot requests, site
  metrics and housekeeping run there too (after the batch), so the engine's state has a
  single writer.

Exactly-once is unchanged: a message is acked only after its WAL record is durable, and a
redelivery of a logged chunk is dropped by the engine (its ack, too, waits for the fsync). A
chunk may be folded before its record is fsynced: a crash then loses the fold with the record,
and the unacked message comes again; a commit in between writes the checkpoint and the next
segment (fsynced) before any version goes out, so a folded chunk's effect is never published
ahead of its durability. A failed group fsync stops the service (``WalSyncFailed``).

SIGTERM/SIGINT (main thread only) set a flag: the message in hand is finished and acked,
the rest of the prefetch is left unacked (the broker redelivers it), and ``run`` returns 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fedmq.aggregator.engine import AggregatorEngine, Decision, Outgoing
from fedmq.aggregator.publisher import Publisher
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.broker.connection import AuthRefusals, Backoff
from fedmq.broker.topology import EXCHANGES, METRICS_QUEUE, SNAPSHOT_REQUESTS_QUEUE, aggregator_queue_specs, updates_queue
from fedmq.broker.transport import BrokerConnectionError, Connect, Delivery, Link, amqp_connect, run_reconnecting
from fedmq.shared.ckks import wire_params
from fedmq.shared.ckks_pool import AddPool, default_workers

logger = logging.getLogger(__name__)

Job = Callable[[], None]


#: jobs waiting for the engine thread; a full queue blocks the connection thread's delivery
#: callback, which stops it reading the socket: at most this many chunks (prechecked, ~2x a
#: message each) are held ahead of the one in hand, whatever the prefetch
LOOKAHEAD = 2


#: group commit: at most this many update chunks share one WAL fsync (the batch ends sooner
#: when no further job is waiting); their acks wait for it, their bodies are held until then
GROUP_COMMIT_MAX = 4


class _EngineThread:
    """Runs jobs one at a time, in order, on one thread. A job that raises stops the jobs of its
    session (``generation``); the error is handed to that session's connection thread.
    ``on_idle`` runs whenever no job is waiting (the service commits its batch there)."""

    def __init__(self, on_idle: Job) -> None:
        self._on_idle = on_idle
        self._jobs: queue.Queue[tuple[int, Job, bool] | None] = queue.Queue(maxsize=LOOKAHEAD)
        self._errors: dict[int, BaseException] = {}
        self._thread = threading.Thread(target=self._loop, name="fedmq-aggregator-engine", daemon=True)
        self._thread.start()

    def submit(self, generation: int, job: Job) -> None:
        self._jobs.put((generation, job, False))

    def barrier(self, generation: int) -> threading.Event:
        """An event set once every job submitted before it has run (or was skipped) and what
        they asked of the link is queued (the batch committed)."""
        done = threading.Event()

        def job() -> None:
            try:
                self._on_idle()
            finally:
                done.set()

        self._jobs.put((generation, job, True))
        return done

    def _loop(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            generation, job, always = item
            if generation in self._errors and not always:
                continue  # its session failed: the broker redelivers what it was about
            try:
                job()
                if self._jobs.empty():
                    self._on_idle()
            except BaseException as exc:  # handed to the connection thread, which ends the session
                self._errors[generation] = exc

    def take_error(self, generation: int) -> BaseException | None:
        return self._errors.get(generation)

    def stop(self, timeout: float = 600) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)


_M_ARENA_MAX = -8  # glibc mallopt parameter


def _one_malloc_arena() -> None:
    """Have every thread allocate from glibc's main arena (no-op elsewhere).

    With two threads, glibc gives the second its own arena: the chunk bytes the connection
    thread allocates are freed back to that arena after the fold, and the engine thread cannot
    reuse them for the committed D it then serializes, so the version run of
    ``benchmarks.resnet50`` peaked at 3.7x the encrypted model instead of 2.7x. One arena keeps
    the memory of one thread's frees for the other's allocations, as with one thread."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def commit_workers(setting: int | None) -> int:
    """The ``commit_workers`` setting, None resolved: one per core beyond the engine's, at most 2."""
    return min(2, default_workers() - 1) if setting is None else setting


class AggregatorService:
    def __init__(self, settings: AggregatorSettings, engine: AggregatorEngine | None = None, *,
                 connect: Connect | None = None) -> None:
        self.settings = settings
        self.engine = engine or AggregatorEngine(settings)
        # several URLs (a cluster's nodes) are tried in order; amqps:// uses the settings' TLS files
        self._connect = connect or amqp_connect(settings.amqp_url, name=f"fedmq-aggregator-shard-{settings.shard_index}",
                                                heartbeat=settings.heartbeat_s, tls=settings)
        self.ready = threading.Event()
        self._stop = threading.Event()
        #: outputs not yet confirmed by the broker: appended by the engine thread, published and
        #: removed (from the left) by the connection thread; kept across reconnects
        self._unpublished: deque[Outgoing] = deque(self.engine.drain_startup())
        self._publisher: Publisher | None = None
        self._last_housekeeping = 0.0
        self.connections = 0
        self._auth = AuthRefusals()
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self._generation = 0
        self._worker: _EngineThread | None = None
        #: group commit (engine thread): chunks logged without fsync, waiting for one
        self._batch: list[tuple[int, Link, Delivery, Decision, list[Outgoing]]] = []

    def stop(self, *_: Any) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        _one_malloc_arena()  # before the metrics and engine threads allocate
        self.engine.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        workers = commit_workers(self.settings.commit_workers)
        if workers:
            self.engine.D.pool = AddPool(wire_params(self.engine.ctx), workers)
        self._worker = _EngineThread(on_idle=self._commit_batch)
        try:
            run_reconnecting(self._session, stop=self._stop, backoff=self._backoff, auth=self._auth,
                             what="aggregator", on_lost=self.ready.clear)
        finally:
            self._worker.stop()
            if self.engine.D.pool is not None:
                self.engine.D.pool.close()
                self.engine.D.pool = None
            self.engine.write_status()
            self.engine.close()
            logger.info("aggregator stopped at version %d", self.engine.version)
        return 0

    def _session(self) -> None:
        assert self._worker is not None
        link = self._connect()
        self._generation += 1
        generation = self._generation
        try:
            link.declare(EXCHANGES, aggregator_queue_specs(self.settings.shard_count))
            self._publisher = Publisher(link, self.engine.metrics)
            self._flush_unpublished()
            on_update = lambda d: self._on_update(link, generation, d)  # noqa: E731
            link.consume(updates_queue(self.settings.shard_index), on_update, self.settings.prefetch)
            if self.settings.shard_index == 0:
                link.consume(SNAPSHOT_REQUESTS_QUEUE, lambda d: self._on_snapshot_request(link, generation, d),
                             self.settings.prefetch)
                link.consume(METRICS_QUEUE, lambda d: self._on_metrics(link, generation, d), self.settings.prefetch)
            self.connections += 1
            self._auth.ok()
            self._backoff.connected()
            self.ready.set()
            logger.info("aggregator consuming %s at version %d", updates_queue(self.settings.shard_index),
                        self.engine.version)
            while not self._stop.is_set():
                link.process(min(0.5, self.settings.housekeeping_s))
                self._raise_engine_error(generation)
                self._housekeeping(link, generation)
            # stopping: let the message in hand finish, and send what it asked for (its ack)
            done = self._worker.barrier(generation)
            while not done.wait(0.05):
                link.process(0.05)
            link.process(0)
            self._raise_engine_error(generation)
        finally:
            self._generation += 1  # jobs still queued for this link are skipped: redelivered later
            self._publisher = None
            link.close()

    def _raise_engine_error(self, generation: int) -> None:
        assert self._worker is not None
        exc = self._worker.take_error(generation)
        if exc is not None:
            raise exc

    def _housekeeping(self, link: Link, generation: int) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < self.settings.housekeeping_s:
            return
        self._last_housekeeping = now

        def job() -> None:
            self._send(link, self.engine.expire())
            self.engine.write_status()

        self._submit(generation, job)

    def _submit(self, generation: int, job: Job, *, after_batch: bool = True) -> None:
        """Queue ``job`` for the engine thread (skipped if its session ended first); unless
        it is an update chunk, the pending batch is committed before it."""
        assert self._worker is not None

        def run() -> None:
            if after_batch:
                self._commit_batch()
            if generation == self._generation:
                job()

        self._worker.submit(generation, run)

    # -------------------------------------------------------------- run on the connection thread

    def _flush_unpublished(self) -> None:
        if self._publisher is None:
            return
        while self._unpublished:
            self._publisher.publish(self._unpublished[0])
            self._unpublished.popleft()

    def _dead_letter(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        if self._publisher is not None:
            self._publisher.dead_letter(delivery, headers)

    # -------------------------------------------------------------- asked by the engine thread

    def _send(self, link: Link, outs: list[Outgoing]) -> None:
        if outs:
            self._unpublished.extend(outs)
            link.call_threadsafe(self._flush_unpublished)

    def _commit_batch(self) -> None:
        """Group commit: one WAL fsync for the batch's chunks, then their dead-letter copies,
        acks and outputs, in order. A dead link of an ended session is no error here: those
        messages are redelivered, and dropped as logged (after a later fsync)."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        self.engine.sync_log()
        failure: BrokerConnectionError | None = None
        for generation, link, d, decision, outs in batch:
            self._unpublished.extend(outs)
            try:
                self._answer(link, d, decision, before_ack=lambda: self.engine.crash("before-ack"))
                if outs:
                    link.call_threadsafe(self._flush_unpublished)
            except BrokerConnectionError as exc:
                if generation == self._generation and failure is None:
                    failure = exc
        if failure is not None:
            raise failure

    def _answer(self, link: Link, d: Delivery, decision: Decision, *, before_ack: Callable[[], None] | None = None) -> None:
        """Dead-letter a refused message, then ack it (both on the connection thread, in order)."""
        if decision.action == "reject":
            headers = decision.dead_letter_headers()
            link.call_threadsafe(lambda: self._dead_letter(d, headers))
        if before_ack is not None:
            before_ack()
        link.call_threadsafe(d.ack)

    # -------------------------------------------------------------- callbacks (connection thread)

    def _on_update(self, link: Link, generation: int, d: Delivery) -> None:
        if self._stop.is_set():
            return  # left unacked: redelivered after we close
        pre = self.engine.precheck(d.body, user_id=d.user_id)  # off the engine thread

        def job() -> None:
            if self._stop.is_set():
                return
            # logged without its own fsync; applied at once (the next chunk's checks see its
            # fold, as in order); acked only after the batch's fsync (_commit_batch)
            decision = self.engine.accept(d.body, user_id=d.user_id, redelivered=d.redelivered, pre=pre, sync=False)
            self._batch.append((generation, link, d, decision, self.engine.apply(decision)))
            if len(self._batch) >= GROUP_COMMIT_MAX:
                self._commit_batch()

        self._submit(generation, job, after_batch=False)

    def _on_snapshot_request(self, link: Link, generation: int, d: Delivery) -> None:
        if self._stop.is_set():
            return

        def job() -> None:
            decision, outs = self.engine.handle_snapshot_request(d.body, user_id=d.user_id)
            if decision.action == "reject":
                headers = decision.dead_letter_headers()
                link.call_threadsafe(lambda: self._dead_letter(d, headers))
            self._send(link, outs)
            link.call_threadsafe(d.ack)

        self._submit(generation, job)

    def _on_metrics(self, link: Link, generation: int, d: Delivery) -> None:
        if self._stop.is_set():
            return

        def job() -> None:
            self._answer(link, d, self.engine.handle_site_metrics(d.body, user_id=d.user_id))

        self._submit(generation, job)


__all__ = ["AggregatorService", "BrokerConnectionError", "Link"]
