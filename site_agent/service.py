"""``fedmq site run``: the long-lived agent next to a hospital's images.

Threads: the main thread owns the pika connection (heartbeats, consuming global versions,
publishing with confirms); one worker thread trains. The worker never touches pika: it hands
its finished, encrypted update back with ``connection.add_callback_threadsafe``. The update
is persisted (with the privacy ledger already charged) before the first chunk is published,
so a crash mid-publish re-sends the same update id on restart instead of a new one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions

from broker import topology
from broker.connection import Backoff, connect, username_of
from shared.codec import CONTENT_TYPE, decode_global_version, encode
from shared.errors import FedmqError, WireError
from shared.schema import SiteMetrics, SnapshotRequest
from shared.signing import load_public_key
from site_agent.global_model import GlobalModelReceiver
from site_agent.runtime import SiteRuntime
from site_agent.settings import SiteSettings
from site_agent.update_builder import shard_of_encoded
from site_agent.version_guard import AuditGap, SiteVersionMetrics, VersionGuard

logger = logging.getLogger(__name__)

#: A test seam: called with (chunk index, chunk count) after each chunk of an update is
#: published and confirmed. Nothing in fedmq sets it; tests inject one (tests/launcher.py) that
#: kills the site between two chunks, to prove the re-sent update still counts once.
ChunkPublishedHook = Callable[[int, int], None]


class SiteAgent:
    def __init__(
        self, settings: SiteSettings, runtime: SiteRuntime | None = None, *, chunk_published_hook: ChunkPublishedHook | None = None
    ) -> None:
        self.settings = settings
        self.rt = runtime or SiteRuntime.open(settings)
        self.guard = VersionGuard(load_public_key(settings.aggregator_public_key), settings.state_dir, settings.shard_count)
        self.version_metrics = SiteVersionMetrics()
        self.receiver = GlobalModelReceiver(self.rt.state, self.rt.ctx, self.rt.layout.fingerprint, self.rt.layout.size,
                                            shard_count=settings.shard_count, guard=self.guard)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._conn: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        #: per shard: the message version a snapshot was last requested for (one request per gap)
        self._snapshot_requested_for: dict[int, int] = {}
        self._user_id = username_of(settings.amqp_url)
        self._last_progress = time.monotonic()
        self._chunk_published_hook = chunk_published_hook

    # -- lifecycle -------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        """Connect, consume and train until stopped; reconnects with backoff after broker loss."""
        logger.info("site agent starting", extra={"site": self.settings.site_id, "version": self.rt.state.version})
        self.version_metrics.serve(self.settings.metrics_port)
        while not self._stop.is_set():
            try:
                self._run_connected()
            except (pika.exceptions.AMQPError, FedmqError, OSError) as exc:
                if self._stop.is_set():
                    break
                delay = self._backoff.next_delay()
                logger.warning("broker connection lost; reconnecting", extra={"error": repr(exc), "delay_s": round(delay, 2)})
                self._stop.wait(delay)
            finally:
                self._close()
        if self._worker is not None:
            self._worker.join()
        logger.info("site agent stopped", extra={"site": self.settings.site_id})

    def _close(self) -> None:
        conn, self._conn, self._channel = self._conn, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except pika.exceptions.AMQPError:
                pass

    def _run_connected(self) -> None:
        self._conn = connect(self.settings.amqp_url, backoff=self._backoff, name=f"fedmq-site-{self.settings.site_id}", tls=self.settings)
        ch = self._channel = self._conn.channel()
        ch.confirm_delivery()
        spec = topology.site_queue_spec(self.settings.site_id)
        try:
            topology.check_declared(ch, (spec,))  # declared by the administrator; sites have no configure right
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                logger.error("site queue missing: an administrator declares it (fedmq broker declare --sites %s)",
                             self.settings.site_id, extra={"queue": spec.name})
            raise
        ch.basic_qos(prefetch_count=8)
        ch.basic_consume(spec.name, self._on_global_message)
        logger.info("connected", extra={"queue": spec.name})
        if self.rt.state.pending is not None:
            self._publish_pending()
        if self.rt.state.version == 0 and self.rt.state.updates_sent == 0:
            for shard in range(self.settings.shard_count):
                self._request_snapshot(-1 if self.rt.state.generation == 0 else 0, "start", shard)
        self._maybe_train()
        while not self._stop.is_set():
            self._conn.process_data_events(time_limit=0.5)
            if time.monotonic() - self._last_progress > self.settings.retrain_after_s:
                self._maybe_train(same_version_ok=True)
            if self._worker is not None and not self._worker.is_alive() and self._stop.is_set():
                break

    # -- global versions -----------------------------------------------------------------
    def _on_global_message(self, ch: Any, method: Any, properties: Any, body: bytes) -> None:
        chunk = None
        try:
            chunk = decode_global_version(body, max_bytes=self.settings.max_message_bytes)
            result = self.receiver.offer(chunk)
        except WireError as exc:
            # nothing was applied: the site keeps its last good model
            logger.error("refused a global-version message: %s: %s", exc.reason, exc.detail,
                         extra={"reason": exc.reason, "detail": exc.detail})
            self.version_metrics.refuse(exc.reason)
            ch.basic_ack(method.delivery_tag)
            if isinstance(exc, AuditGap):  # records missing: ask for a snapshot with them, once
                shard = getattr(chunk, "shard_index", 0)
                have = self.guard.chains[shard].head
                if self._snapshot_requested_for.get(shard) != have:
                    self._request_snapshot(have, f"audit gap: {exc.detail}"[:200], shard)
                    self._snapshot_requested_for[shard] = have
            return
        if result.outcome == "applied":
            self._last_progress = time.monotonic()
            self.rt.save_state()
            self._snapshot_requested_for.pop(result.shard, None)
            ch.basic_ack(method.delivery_tag)
            self._after_new_version()
            return
        ch.basic_ack(method.delivery_tag)
        shard = result.shard
        if result.outcome == "gap" and self._snapshot_requested_for.get(shard) != result.message_version:
            self._request_snapshot(result.version, f"gap: have {result.version}, got {result.message_version}", shard)
            self._snapshot_requested_for[shard] = result.message_version

    def _request_snapshot(self, have: int, reason: str, shard: int = 0) -> None:
        msg = SnapshotRequest(site_id=self.settings.site_id, have_version=have, reason=reason, shard_index=shard)
        self._publish(topology.CONTROL_EXCHANGE, topology.SNAPSHOT_REQUEST_KEY, encode(msg), "snapshot-request")
        logger.info("asked for a snapshot", extra={"have": have, "reason": reason, "shard": shard})

    def _after_new_version(self) -> None:
        metrics = self.rt.evaluate_current()
        msg = SiteMetrics(
            site_id=self.settings.site_id,
            version=self.rt.state.version,
            auc=metrics.get("auc"),
            n_val=int(metrics.get("n", 0)),
            epsilon_spent=float(self.rt.epsilon_spent()),
            epsilon_target=self.settings.target_epsilon if self.settings.dp_enabled else None,
            updates_sent=self.rt.state.updates_sent,
            timestamp=time.time(),
        )
        self._publish(topology.CONTROL_EXCHANGE, topology.METRICS_KEY, encode(msg), "site-metrics")
        logger.info("evaluated global version", extra={"version": msg.version, "auc": msg.auc, "epsilon": msg.epsilon_spent})
        self._maybe_train()

    # -- training ------------------------------------------------------------------------
    def _maybe_train(self, same_version_ok: bool = False) -> None:
        if self._stop.is_set() or (self._worker is not None and self._worker.is_alive()):
            return
        if self.rt.train is None:
            return  # opened without data (an observer): follows versions, never trains
        if self.rt.state.pending is not None:
            return
        if self.rt.state.last_trained_base >= self.rt.state.version and not same_version_ok:
            return  # wait for a newer global model than the one we last trained from
        reason = self.rt.why_not_contribute()
        if reason is not None:
            logger.info("not contributing", extra={"reason": reason})
            return
        base_version = self.rt.state.version
        # each shard's sub-update carries the site's version of that shard
        shard_versions = tuple(self.receiver.versions()) if self.settings.shard_count > 1 else None
        self._last_progress = time.monotonic()
        self._worker = threading.Thread(
            target=self._train_worker, args=(base_version, shard_versions), name="fedmq-train", daemon=True
        )
        self._worker.start()

    def _train_worker(self, base_version: int, shard_versions: tuple[int, ...] | None) -> None:
        conn = self._conn
        try:
            self.rt.train_and_build(base_version, self._stop, shard_versions)
        except Exception:  # a failed round must not kill the service; it is retried on the next version
            logger.exception("local round failed")
            return
        if conn is not None and conn.is_open:
            conn.add_callback_threadsafe(self._on_update_ready)

    def _on_update_ready(self) -> None:
        self._publish_pending()
        self._last_progress = time.monotonic()
        self._maybe_train()

    def _publish_pending(self) -> None:
        state = self.rt.state
        if state.pending is None:
            return
        for i, raw in enumerate(state.pending):
            shard = shard_of_encoded(raw) if self.settings.shard_count > 1 else 0  # its aggregator shard
            self._publish(topology.UPDATES_EXCHANGE, topology.shard_key(shard), raw, "update-chunk", persistent=True)
            if self._chunk_published_hook is not None:
                self._chunk_published_hook(i, len(state.pending))
        logger.info("update published", extra={"seq": state.pending_seq, "chunks": len(state.pending), "bytes": sum(map(len, state.pending))})
        self.rt.mark_pending_published()

    def _publish(self, exchange: str, key: str, body: bytes, kind: str, persistent: bool = True) -> None:
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            delivery_mode=pika.DeliveryMode.Persistent if persistent else pika.DeliveryMode.Transient,
            type=kind,
            user_id=self._user_id,
            timestamp=int(time.time()),
        )
        # With confirm_delivery, basic_publish blocks until the broker confirms (or raises).
        self._channel.basic_publish(exchange, key, body, props, mandatory=True)


def run_site(settings: SiteSettings) -> int:
    agent = SiteAgent(settings)
    agent.install_signal_handlers()
    agent.run()
    return 0


__all__ = ["SiteAgent", "run_site"]
