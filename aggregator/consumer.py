"""The aggregator service: one pika connection, three queues, the engine, reconnects.

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
import random
import signal
import threading
import time
from typing import Any

import pika
import pika.exceptions

from broker.connection import AUTH_REFUSED, AuthRefusals, describe_refusal, parameters_list

from aggregator.engine import AggregatorEngine, Outgoing
from aggregator.publisher import Publisher
from aggregator.settings import AggregatorSettings
from broker.topology import EXCHANGES, METRICS_QUEUE, SNAPSHOT_REQUESTS_QUEUE, aggregator_queue_specs, declare, updates_queue

logger = logging.getLogger(__name__)

_RECOVERABLE = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosed,
    ConnectionError,
    OSError,
)


class AggregatorService:
    def __init__(self, settings: AggregatorSettings, engine: AggregatorEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or AggregatorEngine(settings)
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._unpublished: list[Outgoing] = self.engine.drain_startup()
        self._publisher: Publisher | None = None
        self._last_housekeeping = 0.0
        self.connections = 0
        self._auth = AuthRefusals()

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
        backoff = self.settings.reconnect_initial_s
        try:
            while not self._stop.is_set():
                try:
                    self._session(lambda: setattr(self, "_healthy", True))
                except AUTH_REFUSED as exc:
                    message = describe_refusal(self.settings.amqp_url, exc)
                    self._auth.refused(message)  # raises after a few in a row: exit non-zero
                    logger.error("%s; retrying", message)
                    self._stop.wait(random.uniform(0, backoff))
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
                except _RECOVERABLE as exc:
                    self.ready.clear()
                    if getattr(self, "_healthy", False):
                        backoff = self.settings.reconnect_initial_s  # reset after a successful session
                    self._healthy = False
                    delay = random.uniform(0, backoff)  # full jitter
                    logger.warning("broker connection lost (%s: %s); reconnecting in %.1fs",
                                   type(exc).__name__, exc, delay)
                    self._stop.wait(delay)
                    backoff = min(backoff * 2, self.settings.reconnect_max_s)
        finally:
            self.engine.write_status()
            self.engine.close()
            logger.info("aggregator stopped at version %d", self.engine.version)
        return 0

    def _connect(self) -> pika.BlockingConnection:
        # Several URLs (a cluster's nodes) are tried in order; amqps:// uses the settings' TLS files.
        params = parameters_list(
            self.settings.amqp_url, self.settings.heartbeat_s, f"fedmq-aggregator-shard-{self.settings.shard_index}", self.settings
        )
        return pika.BlockingConnection(params[0] if len(params) == 1 else params)

    def _session(self, on_healthy: Any) -> None:
        conn = self._connect()
        try:
            ch = conn.channel()
            declare(ch, EXCHANGES, aggregator_queue_specs(self.settings.shard_count))
            self._publisher = Publisher(conn.channel(), self.engine.metrics)
            self._publisher.publish_all(self._unpublished)
            ch.basic_qos(prefetch_count=self.settings.prefetch)
            ch.basic_consume(updates_queue(self.settings.shard_index), self._on_update)
            if self.settings.shard_index == 0:
                ch.basic_consume(SNAPSHOT_REQUESTS_QUEUE, self._on_snapshot_request)
                ch.basic_consume(METRICS_QUEUE, self._on_metrics)
            self.connections += 1
            self._auth.ok()
            on_healthy()
            self.ready.set()
            logger.info("aggregator consuming %s at version %d", updates_queue(self.settings.shard_index),
                        self.engine.version)
            while not self._stop.is_set():
                conn.process_data_events(time_limit=min(0.5, self.settings.housekeeping_s))
                self._housekeeping()
        finally:
            self._publisher = None
            try:
                if conn.is_open:
                    conn.close()
            except Exception:  # closing a dead connection
                pass

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

    def _dead_letter(self, body: bytes, props: Any, headers: dict[str, Any]) -> None:
        assert self._publisher is not None
        self._publisher.dead_letter(body, props, headers)

    # -------------------------------------------------------------- callbacks

    def _on_update(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if self._stop.is_set():
            return  # left unacked: redelivered after we close
        decision = self.engine.accept(body, user_id=props.user_id, redelivered=bool(method.redelivered))
        if decision.action == "reject":
            self._dead_letter(body, props, decision.dead_letter_headers())
        self.engine.crash("before-ack")
        ch.basic_ack(method.delivery_tag)
        self._send(self.engine.apply(decision))

    def _on_snapshot_request(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if self._stop.is_set():
            return
        decision, outs = self.engine.handle_snapshot_request(body, user_id=props.user_id)
        if decision.action == "reject":
            self._dead_letter(body, props, decision.dead_letter_headers())
        self._send(outs)
        ch.basic_ack(method.delivery_tag)

    def _on_metrics(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        if self._stop.is_set():
            return
        decision = self.engine.handle_site_metrics(body, user_id=props.user_id)
        if decision.action == "reject":
            self._dead_letter(body, props, decision.dead_letter_headers())
        ch.basic_ack(method.delivery_tag)
