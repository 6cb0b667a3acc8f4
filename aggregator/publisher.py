"""Publishing with publisher confirms: global versions, snapshots and dead-letter copies."""

from __future__ import annotations

import datetime
import decimal

import logging
from typing import Any

import pika

from aggregator.engine import Outgoing
from aggregator.metrics import AggregatorMetrics
from broker.topology import DEAD_LETTER_BODY_BYTES, DEAD_LETTER_EXCHANGE, ORIGINAL_SIZE_HEADER
from shared.codec import CONTENT_TYPE

logger = logging.getLogger(__name__)


def amqp_safe(value: Any) -> Any:
    """Header values pika can re-encode: a poison message's odd headers (floats from other
    clients, unknown types) must not crash the dead-letter path that exists to absorb it."""
    if isinstance(value, dict):
        return {str(k): amqp_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [amqp_safe(v) for v in value]
    if value is None or isinstance(value, (str, bytes, bool, int, decimal.Decimal, datetime.datetime)):
        return value
    return repr(value)


class Publisher:
    """Wraps one confirm-mode channel; every publish returns once the broker has it."""

    def __init__(self, channel: Any, metrics: AggregatorMetrics) -> None:
        self.channel = channel
        self.channel.confirm_delivery()
        self.metrics = metrics

    def publish(self, out: Outgoing) -> None:
        props = pika.BasicProperties(
            delivery_mode=2, content_type=CONTENT_TYPE, type=out.kind, headers=out.headers or None,
            app_id="fedmq-aggregator",
        )
        self.channel.basic_publish(out.exchange, out.routing_key, out.body, props)
        self.metrics.bytes_out.inc(len(out.body))

    def publish_all(self, outs: list[Outgoing]) -> None:
        """Publishes in order; on failure the unsent tail stays in ``outs`` for a retry."""
        while outs:
            self.publish(outs[0])
            outs.pop(0)

    def dead_letter(self, body: bytes, properties: Any, headers: dict[str, Any]) -> None:
        """A copy of a refused message: original properties and headers plus the reason headers,
        and at most the first :data:`DEAD_LETTER_BODY_BYTES` of its body (the original size in
        a header), so a refused large message is never duplicated into the dead-letter queue."""
        merged = amqp_safe(dict(properties.headers or {})) if properties is not None else {}
        merged.update(headers)
        if len(body) > DEAD_LETTER_BODY_BYTES:
            merged[ORIGINAL_SIZE_HEADER] = len(body)
            body = body[:DEAD_LETTER_BODY_BYTES]
        props = pika.BasicProperties(
            content_type=getattr(properties, "content_type", None),
            content_encoding=getattr(properties, "content_encoding", None),
            headers=merged,
            delivery_mode=2,
            priority=getattr(properties, "priority", None),
            correlation_id=getattr(properties, "correlation_id", None),
            reply_to=getattr(properties, "reply_to", None),
            message_id=getattr(properties, "message_id", None),
            timestamp=getattr(properties, "timestamp", None),
            type=getattr(properties, "type", None),
            app_id=getattr(properties, "app_id", None),
            # user_id is not copied: RabbitMQ would refuse it, it names the sender, not us
        )
        self.channel.basic_publish(DEAD_LETTER_EXCHANGE, "", body, props)
        self.metrics.bytes_out.inc(len(body))
