"""Publishing the engine's outputs: intents mapped onto topology names, dead-letter copies.

Every publish goes through the transport seam (``broker.transport.Link``), which returns once
the broker confirmed the message.
"""

from __future__ import annotations

import datetime
import decimal
import logging
from typing import Any

from fedmq.aggregator.engine import Intent, Outgoing
from fedmq.aggregator.metrics import AggregatorMetrics
from fedmq.broker import topology
from fedmq.broker.transport import CARRIED_PROPERTIES, Delivery, Link, Message

logger = logging.getLogger(__name__)

APP_ID = "fedmq-aggregator"


def route(intent: Intent, site_id: str | None = None) -> tuple[str, str]:
    """(exchange, routing key) for an engine intent: the one place intents meet topology names."""
    if intent is Intent.VERSION_TO_ALL:
        return topology.GLOBAL_EXCHANGE, ""
    if intent is Intent.TO_SITE:
        if not site_id:
            raise ValueError("Intent.TO_SITE needs a site id")
        return topology.SITE_DIRECT_EXCHANGE, site_id
    return topology.DEAD_LETTER_EXCHANGE, ""


def amqp_safe(value: Any) -> Any:
    """Header values the AMQP client can re-encode: a poison message's odd headers (floats from
    other clients, unknown types) must not crash the dead-letter path that exists to absorb it."""
    if isinstance(value, dict):
        return {str(k): amqp_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [amqp_safe(v) for v in value]
    if value is None or isinstance(value, (str, bytes, bool, int, decimal.Decimal, datetime.datetime)):
        return value
    return repr(value)


class Publisher:
    """Publishes over one link; every publish returns once the broker has it."""

    def __init__(self, link: Link, metrics: AggregatorMetrics) -> None:
        self.link = link
        self.metrics = metrics

    def publish(self, out: Outgoing) -> None:
        exchange, key = route(out.intent, out.site_id)
        body = out.body
        self.link.publish(Message(exchange, key, body, kind=out.kind, headers=out.headers, app_id=APP_ID))
        self.metrics.bytes_out.inc(len(body))

    def publish_all(self, outs: list[Outgoing]) -> None:
        """Publishes in order; on failure the unsent tail stays in ``outs`` for a retry."""
        while outs:
            self.publish(outs[0])
            outs.pop(0)

    def dead_letter(self, delivery: Delivery, headers: dict[str, Any]) -> None:
        """A copy of a refused message: original properties and headers plus the reason headers,
        and at most the first :data:`~broker.topology.DEAD_LETTER_BODY_BYTES` of its body (the
        original size in a header), so a refused large message is never duplicated into the
        dead-letter queue. user_id is not copied: it names the sender, not us."""
        merged = amqp_safe(dict(delivery.headers))
        merged.update(headers)
        body = delivery.body
        if len(body) > topology.DEAD_LETTER_BODY_BYTES:
            merged[topology.ORIGINAL_SIZE_HEADER] = len(body)
            body = body[: topology.DEAD_LETTER_BODY_BYTES]
        props = {k: delivery.properties.get(k) for k in CARRIED_PROPERTIES}
        exchange, key = route(Intent.DEAD_LETTER)
        self.link.publish(Message(
            exchange, key, body, kind=props.pop("type"), content_type=props.pop("content_type"), headers=merged,
            app_id=props.pop("app_id"), timestamp=props.pop("timestamp"), extra=props,
        ))
        self.metrics.bytes_out.inc(len(body))
