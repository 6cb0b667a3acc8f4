"""``fedmq site run``: the long-lived agent next to a hospital's images.

Threads: the main thread owns the broker link (``broker.transport``: heartbeats, consuming
global versions, publishing with confirms); one worker thread trains. The worker never touches
the link: it hands its finished, encrypted update back with ``Link.call_threadsafe``. The update
is persisted (with the privacy ledger already charged) before the first chunk is published,
so a crash mid-publish re-sends the same update id on restart instead of a new one.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from fedmq.broker import topology
from fedmq.broker.connection import AuthRefusals, Backoff, username_of
from fedmq.broker.transport import Connect, Delivery, Link, Message, QueueMissing, amqp_connect, run_reconnecting
from fedmq.shared.codec import decode, encode
from fedmq.shared.errors import ConfigError, FedmqError, LayoutMismatch, UnknownMessageKind, WireError
from fedmq.shared.schema import NO_VERSION_YET, GlobalVersionChunk, Rejection, SiteMetrics, SnapshotRequest
from fedmq.shared.signing import load_public_key
from fedmq.site_agent.global_model import GlobalModelReceiver
from fedmq.site_agent.runtime import SiteRuntime
from fedmq.site_agent.settings import SiteSettings
from fedmq.site_agent.update_builder import shard_of_encoded
from fedmq.site_agent.version_guard import AuditGap, SiteVersionMetrics, VersionGuard

logger = logging.getLogger(__name__)

#: A test seam: called with (chunk index, chunk count) after each chunk of an update is
#: published and confirmed. Nothing in fedmq sets it; tests inject one (tests/launcher.py) that
#: kills the site between two chunks, to prove the re-sent update still counts once.
ChunkPublishedHook = Callable[[int, int], None]


#: the aggregator's reason for "this site's sequence went backwards" (aggregator/seqguard.py)
SEQUENCE_BACKWARDS = "sequence-backwards"


class KnownIdentityWithoutState(ConfigError):
    """The aggregator already knows this site id, but this state directory is empty."""


class SiteAgent:
    def __init__(
        self, settings: SiteSettings, runtime: SiteRuntime | None = None, *, chunk_published_hook: ChunkPublishedHook | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.settings = settings
        self.rt = runtime or SiteRuntime.open(settings)
        self.guard = VersionGuard(load_public_key(settings.aggregator_public_key), settings.state_dir, settings.shard_count)
        self.version_metrics = SiteVersionMetrics()
        self.receiver = GlobalModelReceiver(self.rt.owner, self.rt.ctx, self.rt.layout.fingerprint, self.rt.layout.size,
                                            shard_count=settings.shard_count, guard=self.guard)
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._connect = connect or amqp_connect(settings.amqp_url, name=f"fedmq-site-{settings.site_id}", tls=settings)
        self._link: Link | None = None
        #: set while consuming; cleared when the link is lost
        self.connected = threading.Event()
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        #: per shard: the message version a snapshot was last requested for (one request per gap)
        self._snapshot_requested_for: dict[int, int] = {}
        self._user_id = username_of(settings.amqp_url)
        self._last_progress = time.monotonic()
        self._chunk_published_hook = chunk_published_hook
        #: a fresh site waits for the aggregator's answer to its start request until then
        self._join_deadline: float | None = None
        self._join_done = False
        #: started with an empty state dir (no ledger, no state): a known identity is then fatal
        self._started_fresh = self.rt.state.generation == 0
        self._fatal: FedmqError | None = None
        self._auth = AuthRefusals()

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
        run_reconnecting(self._session, stop=self._stop, backoff=self._backoff, auth=self._auth,
                         what=f"site {self.settings.site_id}", on_lost=self.connected.clear,
                         recoverable=(FedmqError, OSError), fatal=(KnownIdentityWithoutState,))
        if self._worker is not None:
            self._worker.join()
        logger.info("site agent stopped", extra={"site": self.settings.site_id})

    def _session(self) -> None:
        """One connected session; a fatal error (``KnownIdentityWithoutState``) is not a
        ``FedmqError`` the reconnect loop retries, so it ends ``run``."""
        try:
            self._run_connected()
            if self._fatal is not None:
                raise self._fatal
        finally:
            self.connected.clear()
            link, self._link = self._link, None
            if link is not None:
                link.close()

    def _run_connected(self) -> None:
        link = self._link = self._connect()
        self._auth.ok()
        self._backoff.connected()
        spec = topology.site_queue_spec(self.settings.site_id)
        try:
            link.check_declared((spec,))  # declared by the administrator; sites have no configure right
        except QueueMissing:
            logger.error("site queue missing: an administrator declares it (fedmq broker declare --sites %s)",
                         self.settings.site_id, extra={"queue": spec.name})
            raise
        link.consume(spec.name, self._on_global_message, prefetch=8)
        self.connected.set()
        logger.info("connected", extra={"queue": spec.name})
        if self.rt.state.pending is not None:
            self._publish_pending()
        if self.rt.state.version == 0 and self.rt.state.updates_sent == 0:
            fresh = self.rt.state.generation == 0
            for shard in range(self.settings.shard_count):
                self._request_snapshot(-1 if fresh else 0, "start", shard)
            if fresh and not self._join_done and self._join_deadline is None and self.settings.join_wait_s > 0:
                # an empty state dir: before any budget is charged, let the aggregator say whether
                # this id already contributed (then our ledger was lost: refuse to start)
                self._join_deadline = time.monotonic() + self.settings.join_wait_s
        self._maybe_train()
        while not self._stop.is_set() and self._fatal is None:
            link.process(0.5)
            if self._join_deadline is not None and time.monotonic() >= self._join_deadline:
                # No answer yet (the aggregator is down, busy, or has not read the request): ask
                # again rather than start. The aggregator answers every start request (a snapshot,
                # or "no version yet" at version 0); a round trained from x_0 while the federation
                # is past version 0 would spend budget on an update refused as too stale.
                self._join_deadline = time.monotonic() + self.settings.join_wait_s
                logger.info("no answer from the aggregator to our start request yet; asking again",
                            extra={"waited_s": self.settings.join_wait_s})
                for shard in range(self.settings.shard_count):
                    self._request_snapshot(-1, "start (no answer yet)", shard)
            if time.monotonic() - self._last_progress > self.settings.retrain_after_s:
                self._maybe_train(same_version_ok=True)
            if self._worker is not None and not self._worker.is_alive() and self._stop.is_set():
                break

    # -- global versions -----------------------------------------------------------------
    def _on_global_message(self, delivery: Delivery) -> None:
        chunk = None
        try:
            msg = decode(delivery.body, max_bytes=self.settings.max_message_bytes)
            if isinstance(msg, Rejection):
                delivery.ack()
                self._on_notice(msg)
                return
            if not isinstance(msg, GlobalVersionChunk):
                raise UnknownMessageKind(f"a {type(msg).__name__} has no business on a site queue")
            chunk = msg
            result = self.receiver.offer(chunk)
        except LayoutMismatch as exc:
            delivery.ack()
            self._on_layout_mismatch(msg, exc)
            return
        except WireError as exc:
            # nothing was applied: the site keeps its last good model
            logger.error("refused a global-version message: %s: %s", exc.reason, exc.detail,
                         extra={"reason": exc.reason, "detail": exc.detail})
            self.version_metrics.refuse(exc.reason)
            delivery.ack()
            if isinstance(exc, AuditGap):  # records missing: ask for a snapshot with them, once
                shard = getattr(chunk, "shard_index", 0)
                have = self.guard.chains[shard].head
                if self._snapshot_requested_for.get(shard) != have:
                    self._request_snapshot(have, f"audit gap: {exc.detail}"[:200], shard)
                    self._snapshot_requested_for[shard] = have
            return
        if result.outcome == "applied":
            if chunk.target_site == self.settings.site_id and self._join_deadline is not None:
                # the aggregator answered our start request with a snapshot: no objection
                self._join_deadline, self._join_done = None, True
            self._last_progress = time.monotonic()
            self.rt.save_state()
            self._snapshot_requested_for.pop(result.shard, None)
            delivery.ack()
            self._after_new_version()
            return
        delivery.ack()
        if result.outcome == "old" and chunk.target_site == self.settings.site_id and self._join_deadline is not None:
            # the answer to our start request is a version we already hold (its deltas came first)
            self._join_deadline, self._join_done = None, True
            self._maybe_train()
            return
        shard = result.shard
        if result.outcome == "gap" and self._snapshot_requested_for.get(shard) != result.message_version:
            self._request_snapshot(result.version, f"gap: have {result.version}, got {result.message_version}", shard)
            self._snapshot_requested_for[shard] = result.message_version

    def _on_layout_mismatch(self, msg: object, exc: LayoutMismatch) -> None:
        """A global version for another model: every round here would be wasted. Pause, naming both."""
        from fedmq.site_agent.model_state import describe_layout_mismatch

        if self.rt.pause_file.reason():
            return
        theirs = getattr(msg, "layout_fingerprint", None)
        if not isinstance(theirs, str) or theirs == self.rt.layout.fingerprint:
            logger.error("refused a global-version message", extra={"reason": exc.reason, "detail": exc.detail})
            return
        reason = describe_layout_mismatch(theirs, self.settings.model_preset, self.settings.init_seed,
                                          self.rt.layout.fingerprint, "the federation's global model")
        self.rt.pause_file.pause("layout-fingerprint", reason)
        logger.error("pausing contributions until `fedmq site resume`", extra={"reason": reason})

    def _on_notice(self, notice: Rejection) -> None:
        """A notice from the aggregator on our own queue. Sequence-backwards means our state
        directory is behind what the aggregator already accepted from us: never train on."""
        if notice.reason in ("layout-fingerprint", "key-fingerprint"):
            reason = (f"the aggregator refused update {notice.update_id}: {notice.detail}. This site: model_preset "
                      f"{self.settings.model_preset!r}, init_seed {self.settings.init_seed}, layout "
                      f"{self.rt.layout.fingerprint}, CKKS key {self.rt.ctx.fingerprint} ({self.settings.secret_context})")
            self.rt.pause_file.pause(notice.reason, reason)
            logger.error("pausing contributions until `fedmq site resume`", extra={"reason": reason})
            return
        if notice.reason == NO_VERSION_YET:
            if notice.site_id == self.settings.site_id and self._join_deadline is not None:
                # the federation is at version 0 and the aggregator does not know this id: start
                self._join_deadline, self._join_done = None, True
                logger.info("the aggregator answered: no version yet; starting from x_0")
                self._maybe_train()
            return
        if notice.reason != SEQUENCE_BACKWARDS:
            logger.warning("notice from the aggregator", extra={"reason": notice.reason, "detail": notice.detail})
            return
        last_sent = self.rt.state.next_seq - 1
        ours = notice.update_id is None or notice.update_id.split(":")[1:2] == [str(last_sent)]
        if not ours:
            # an older update of ours replayed by someone holding our broker credentials
            logger.error("the aggregator refused a replay of an old update of this site: are this site's broker "
                         "credentials used elsewhere?", extra={"update_id": notice.update_id, "detail": notice.detail})
            return
        if self._started_fresh and self.rt.state.updates_sent == 0 and not self.settings.join_new_federation:
            self._fatal = KnownIdentityWithoutState(
                f"refusing to start: the aggregator already accepted {notice.last_seq} update(s) from site "
                f"{self.settings.site_id!r}, but the state directory {self.settings.state_dir} is empty, so the "
                f"privacy budget already spent is unknown here. Restore the state directory (state.json and "
                f"privacy-ledger.json) from backup; set join_new_federation = true only to join a new federation."
            )
            logger.error("%s", self._fatal)
            return
        reason = (f"the aggregator already accepted seq {notice.last_seq} from this site but we are at seq "
                  f"{last_sent}: this state directory was lost or restored from an old copy ({notice.detail})")
        self.rt.pause_file.pause(SEQUENCE_BACKWARDS, reason)
        self._join_deadline, self._join_done = None, True
        logger.error("pausing contributions until `fedmq site resume`", extra={"reason": reason})
        self._publish_metrics(self.rt.evaluate_current())

    def _request_snapshot(self, have: int, reason: str, shard: int = 0) -> None:
        msg = SnapshotRequest(site_id=self.settings.site_id, have_version=have, reason=reason, shard_index=shard)
        self._publish(topology.CONTROL_EXCHANGE, topology.SNAPSHOT_REQUEST_KEY, encode(msg), "snapshot-request")
        logger.info("asked for a snapshot", extra={"have": have, "reason": reason, "shard": shard})

    def _after_new_version(self) -> None:
        metrics = self.rt.evaluate_current()
        if metrics.get("n"):
            self.rt.observe_version(metrics)
        self._publish_metrics(metrics)
        self._maybe_train()

    def _publish_metrics(self, metrics: dict[str, float]) -> None:
        msg = SiteMetrics(
            site_id=self.settings.site_id,
            version=self.rt.state.version,
            auc=metrics.get("auc"),
            n_val=int(metrics.get("n", 0)),
            epsilon_spent=float(self.rt.epsilon_spent()),
            epsilon_target=self.settings.target_epsilon if self.settings.dp_enabled else None,
            updates_sent=self.rt.state.updates_sent,
            timestamp=time.time(),
            alert=alert[:500] if (alert := self.rt.alert()) else None,
        )
        self._publish(topology.CONTROL_EXCHANGE, topology.METRICS_KEY, encode(msg), "site-metrics")
        logger.info("evaluated global version", extra={"version": msg.version, "auc": msg.auc,
                                                       "loss": metrics.get("loss"), "epsilon": msg.epsilon_spent,
                                                       **({"alert": msg.alert} if msg.alert else {})})

    # -- training ------------------------------------------------------------------------
    def _maybe_train(self, same_version_ok: bool = False) -> None:
        if self._stop.is_set() or (self._worker is not None and self._worker.is_alive()):
            return
        if self.rt.train is None:
            return  # opened without data (an observer): follows versions, never trains
        if self.rt.state.pending is not None:
            return
        if self._join_deadline is not None:  # waiting for the aggregator's answer to our start request
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
        link = self._link
        try:
            self.rt.train_and_build(base_version, self._stop, shard_versions)
        except Exception:  # a failed round must not kill the service; it is retried on the next version
            logger.exception("local round failed")
            return
        if link is not None and link.is_open:
            link.call_threadsafe(self._on_update_ready)

    def _on_update_ready(self) -> None:
        self._publish_pending()
        self._last_progress = time.monotonic()
        # async: the next round starts now, from the newest version held (FedBuff's clients)
        self._maybe_train(same_version_ok=self.settings.train_continuously)

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
        """Blocks until the broker confirms (or raises ``BrokerConnectionError``)."""
        assert self._link is not None
        self._link.publish(Message(exchange, key, body, kind=kind, user_id=self._user_id, persistent=persistent,
                                   mandatory=True, timestamp=int(time.time())))


def run_site(settings: SiteSettings) -> int:
    """Raises ``KnownIdentityWithoutState`` (exit 2 through the CLI) when our ledger is lost."""
    agent = SiteAgent(settings)
    agent.install_signal_handlers()
    agent.run()
    return 0


__all__ = ["SiteAgent", "run_site"]
