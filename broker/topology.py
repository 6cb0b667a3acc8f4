"""Every exchange, queue and routing key name, and the arguments each is declared with.

Nothing else in fedmq spells a name: services, provisioning, the definitions export and
tests all call these functions, so renaming or re-arguing a queue happens here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES

PREFIX = "fedmq"

UPDATES_EXCHANGE = f"{PREFIX}.updates"  # direct; routing key = shard name
GLOBAL_EXCHANGE = f"{PREFIX}.global"  # fanout; every site queue is bound
SITE_DIRECT_EXCHANGE = f"{PREFIX}.site-direct"  # direct; routing key = site id (snapshots, notices)
CONTROL_EXCHANGE = f"{PREFIX}.control"  # direct; snapshot requests and metrics from sites
DEAD_LETTER_EXCHANGE = f"{PREFIX}.dlx"  # fanout
DEAD_LETTER_QUEUE = f"{PREFIX}.dead-letter"
SNAPSHOT_REQUESTS_QUEUE = f"{PREFIX}.control.snapshot-requests"
METRICS_QUEUE = f"{PREFIX}.control.metrics"
SNAPSHOT_REQUEST_KEY = "snapshot-request"
METRICS_KEY = "metrics"

#: headers the aggregator sets on dead-lettered messages
REASON_HEADER = "x-fedmq-reason"
DETAIL_HEADER = "x-fedmq-detail"

#: bounded per-site queue of global versions: a site that falls further behind than this
#: loses the oldest versions (drop-head) and asks for a snapshot when it sees the gap.
SITE_QUEUE_MAX_LENGTH = 64

#: RabbitMQ's ``max_message_size`` for every broker fedmq ships or starts: twice the largest
#: chunk the codec makes (settings cannot raise ``max_message_bytes`` above it), so a real
#: chunk always passes and a 64 MiB publish is refused by the broker before any consumer
#: copies it anywhere. 3.10's default is 128 MiB.
BROKER_MAX_MESSAGE_SIZE = 2 * DEFAULT_MAX_MESSAGE_BYTES

#: the dead-letter queue is a bounded ring: the newest refusals are kept, the oldest dropped
#: (``drop-head``) once it holds this many messages or bytes. Every refusal is still counted by
#: reason in the aggregator's metrics, so dropping old copies loses evidence, never the count.
DEAD_LETTER_MAX_LENGTH = 10_000
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024
#: the aggregator's dead-letter copy of a refused message keeps its headers and this much of
#: its body (enough to see what it was; a copy must never amplify a large message)
DEAD_LETTER_BODY_BYTES = 1024
#: header on a truncated dead-letter copy: the original body length in bytes
ORIGINAL_SIZE_HEADER = "x-fedmq-original-size"


def rabbitmq_conf_limits() -> list[str]:
    """``rabbitmq.conf`` lines every fedmq broker carries (private node, compose, deploy)."""
    return [f"max_message_size = {BROKER_MAX_MESSAGE_SIZE}"]


def shard_key(shard: int) -> str:
    return f"shard-{shard}"


def updates_queue(shard: int = 0) -> str:
    return f"{PREFIX}.updates.{shard_key(shard)}"


def site_queue(site_id: str) -> str:
    return f"{PREFIX}.site.{site_id}.global"


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: Literal["direct", "fanout", "topic"]


EXCHANGES: tuple[ExchangeSpec, ...] = (
    ExchangeSpec(UPDATES_EXCHANGE, "direct"),
    ExchangeSpec(GLOBAL_EXCHANGE, "fanout"),
    ExchangeSpec(SITE_DIRECT_EXCHANGE, "direct"),
    ExchangeSpec(CONTROL_EXCHANGE, "direct"),
    ExchangeSpec(DEAD_LETTER_EXCHANGE, "fanout"),
)


def _quorum(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    args: dict[str, Any] = {"x-queue-type": "quorum", "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    args.update(extra or {})
    return args


def updates_queue_spec(shard: int = 0) -> QueueSpec:
    # delivery-limit: a message that keeps crashing consumers is dead-lettered, not looped.
    return QueueSpec(updates_queue(shard), _quorum({"x-delivery-limit": 20}), ((UPDATES_EXCHANGE, shard_key(shard)),))


def site_queue_spec(site_id: str) -> QueueSpec:
    return QueueSpec(
        site_queue(site_id),
        _quorum({"x-max-length": SITE_QUEUE_MAX_LENGTH, "x-overflow": "drop-head"}),
        ((GLOBAL_EXCHANGE, ""), (SITE_DIRECT_EXCHANGE, site_id)),
    )


def control_queue_specs() -> tuple[QueueSpec, ...]:
    return (
        QueueSpec(SNAPSHOT_REQUESTS_QUEUE, _quorum({"x-delivery-limit": 5}), ((CONTROL_EXCHANGE, SNAPSHOT_REQUEST_KEY),)),
        QueueSpec(METRICS_QUEUE, _quorum({"x-max-length": 10_000, "x-overflow": "drop-head"}), ((CONTROL_EXCHANGE, METRICS_KEY),)),
    )


def dead_letter_queue_spec() -> QueueSpec:
    return QueueSpec(
        DEAD_LETTER_QUEUE,
        {
            "x-queue-type": "quorum",
            "x-max-length": DEAD_LETTER_MAX_LENGTH,
            "x-max-length-bytes": DEAD_LETTER_MAX_BYTES,
            "x-overflow": "drop-head",
        },
        ((DEAD_LETTER_EXCHANGE, ""),),
    )


def aggregator_queue_specs(shards: int = 1) -> tuple[QueueSpec, ...]:
    return (
        *(updates_queue_spec(s) for s in range(shards)),
        *control_queue_specs(),
        dead_letter_queue_spec(),
    )


def check_declared(channel: Any, queues: tuple[QueueSpec, ...]) -> None:
    """Passive declares: a site only checks that the queues an administrator declared for it
    exist (it has no configure right, so it cannot create or re-bind anything)."""
    for q in queues:
        channel.queue_declare(queue=q.name, passive=True)


def declare(channel: Any, exchanges: tuple[ExchangeSpec, ...], queues: tuple[QueueSpec, ...]) -> None:
    """Idempotent declaration with a pika blocking channel (same arguments every time)."""
    for ex in exchanges:
        channel.exchange_declare(exchange=ex.name, exchange_type=ex.type, durable=True)
    for q in queues:
        channel.queue_declare(queue=q.name, durable=True, arguments=q.arguments)
        for exchange, key in q.bindings:
            channel.queue_bind(queue=q.name, exchange=exchange, routing_key=key)
