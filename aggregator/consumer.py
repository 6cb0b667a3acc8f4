"""The aggregator service: one broker link, three queues, the engine, reconnects.

The link comes from the transport seam (``broker.transport``): pika in production, the
in-memory ``StubBroker`` in fast tests; reconnects go through ``run_reconnecting``, the loop
every fedmq service shares.

Threading: everything runs on the connection thread. Per chunk the work is decode + verify
+ WAL fsync, then (after the ack) deserialize + fold; the commit of a version serializes
the changed blocks and writes the checkpoint. Measured on 2 cores (docs/aggregation.md):
well under a second per chunk and per commit for a ~1M-parameter model, far inside the
60 s heartbeat, so no worker thread is needed.

SIGTERM/SIGINT (main thread only) set a flag: the message in hand is finished and acked,
the rest of the prefetch is left unacked (the broker redelivers it), and ``run`` returns 0.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from aggregator.engine import AggregatorEngine, Outgoing
from aggregator.publisher import Publisher
from aggregator.settings import AggregatorSettings
from broker.connection import AuthRefusals, Backoff
from broker.topology import EXCHANGES, METRICS_QUEUE, SNAPSHOT_REQUESTS_QUEUE, aggregator_queue_specs, updates_queue
from broker.transport import Connect, Delivery, Link, amqp_connect, run_reconnecting

logger = logging.getLogger(__name__)


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
        self._unpublished: list[Outgoing] = self.engine.drain_startup()
        self._publisher: Publisher | None = None
        self._last_housekeeping = 0.0
        self.connections = 0
        self._auth = AuthRefusals()
        self._backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)

    def stop(self, *_: Any) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self.engine.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
        try:
            run_reconnecting(self._session, stop=self._stop, backoff=self._backoff, auth=self._auth,
                             what="aggregator", on_lost=self.ready.clear)
        finally:
            self.engine.write_status()
            self.engine.close()
            logger.info("aggregator stopped at version %d", self.engine.version)
        return 0

    def _session(self) -> None:
        link = self._connect()
        try:
            link.declare(EXCHANGES, aggregator_queue_specs(self.settings.shard_count))
            self._publisher = Publisher(link, self.engine.metrics)
            self._publisher.publish_all(self._unpublished)
            link.consume(updates_queue(self.settings.shard_index), self._on_update, self.settings.prefetch)
            if self.settings.shard_index == 0:
                link.consume(SNAPSHOT_REQUESTS_QUEUE, self._on_snapshot_request, self.settings.prefetch)
                link.consume(METRICS_QUEUE, self._on_metrics, self.settings.prefetch)
            self.connections += 1
            self._auth.ok()
            self._backoff.connected()
            self.ready.set()
            logger.info("aggregator consuming %s at version %d", updates_queue(self.settings.shard_index),
                        self.engine.version)
            while not self._stop.is_set():
                link.process(min(0.5, self.settings.housekeeping_s))
                self._housekeeping()
        finally:
            self._publisher = None
            link.close()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < self.settings.housekeeping_s:
            return
        self._last_housekeeping = now
        self._send(self.engine.expire())
        self.engine.write_status()

    def _send(self, outs: list[Outgoing]) -> None:
        if not outs:
            return
        self._unpublished.extend(outs)
        assert self._publisher is not None
        self._publisher.publish_all(self._unpublished)

    def _dead_letter(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        assert self._publisher is not None
        self._publisher.dead_letter(delivery, headers)

    # -------------------------------------------------------------- callbacks

    def _on_update(self, d: Delivery) -> None:
        if self._stop.is_set():
            return  # left unacked: redelivered after we close
        decision = self.engine.accept(d.body, user_id=d.user_id, redelivered=d.redelivered)
        if decision.action == "reject":
            self._dead_letter(d, decision.dead_letter_headers())
        self.engine.crash("before-ack")
        d.ack()
        self._send(self.engine.apply(decision))

    def _on_snapshot_request(self, d: Delivery) -> None:
        if self._stop.is_set():
            return
        decision, outs = self.engine.handle_snapshot_request(d.body, user_id=d.user_id)
        if decision.action == "reject":
            self._dead_letter(d, decision.dead_letter_headers())
        self._send(outs)
        d.ack()

    def _on_metrics(self, d: Delivery) -> None:
        if self._stop.is_set():
            return
        decision = self.engine.handle_site_metrics(d.body, user_id=d.user_id)
        if decision.action == "reject":
            self._dead_letter(d, decision.dead_letter_headers())
        d.ack()


__all__ = ["AggregatorService", "Link"]
