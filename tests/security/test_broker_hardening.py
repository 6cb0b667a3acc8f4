"""Attacks on a provisioned federation that the broker itself must stop (issue 15): a guest
login, an oversize publish, and an unbounded dead-letter queue. docs/threat-model.md lists
each attack with its fix and the test here that proves it."""

from __future__ import annotations

import pika
import pika.exceptions
import pytest

from fedmq.broker import topology
from testkit.broker import Broker
from fedmq.broker.local_node import GUEST_USER
from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES
from tests.security.helpers import ProvisionedVhost, connect

pytestmark = [pytest.mark.security, pytest.mark.broker]


def _private_node(broker: Broker) -> Broker:
    if broker.source != "local":
        pytest.skip(f"{broker!r} is not a node fedmq started (its config is not ours)")
    return broker


def test_guest_cannot_log_in(broker: Broker, federation: ProvisionedVhost) -> None:
    """The private node (tests, demo, ``fedmq broker local``) has no guest account: a login
    from localhost as guest/guest is refused, on ``/`` and on a provisioned federation vhost."""
    node = _private_node(broker).node
    assert node is not None
    for vhost in ("/", federation.namespace.vhost):
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            connect(node.url_for_vhost(vhost, username=GUEST_USER, password=GUEST_USER)).close()
    users = broker.rabbitmqctl("list_users", "--no-table-headers")
    assert GUEST_USER not in {line.split()[0] for line in users.splitlines() if line.strip()}


def test_oversize_publish_is_refused_by_the_broker(broker: Broker, federation: ProvisionedVhost) -> None:
    """A site publishing more than max_message_size (2x the largest chunk) has its channel
    closed by the broker; the largest chunk the codec makes still goes through."""
    _private_node(broker)
    site = connect(federation.url(federation.site_a))
    try:
        ch = site.channel()
        ch.confirm_delivery()
        props = pika.BasicProperties(user_id=federation.site_a, type="update-chunk", delivery_mode=2)
        ch.basic_publish(topology.UPDATES_EXCHANGE, topology.shard_key(0), b"\0" * DEFAULT_MAX_MESSAGE_BYTES, props)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            ch.basic_publish(
                topology.UPDATES_EXCHANGE, topology.shard_key(0), b"\0" * (topology.BROKER_MAX_MESSAGE_SIZE + 1), props
            )
            ch.queue_declare(topology.site_queue(federation.site_a), passive=True)
        assert info.value.reply_code == 406 and "max size" in info.value.reply_text, info.value.reply_text
    finally:
        if site.is_open:
            site.close()
    admin = connect(federation.admin_url)
    try:
        assert admin.channel().queue_purge(topology.updates_queue(0)).method.message_count == 1
    finally:
        admin.close()


def test_dead_letter_queue_is_capped(broker: Broker, federation: ProvisionedVhost) -> None:
    """The dead-letter queue is a bounded ring: over its bytes cap the broker drops the oldest
    copies (drop-head), so nothing routed into it can fill the disk."""
    out = broker.rabbitmqctl("list_queues", "-p", federation.namespace.vhost, "name", "arguments", "--no-table-headers")
    line = next(line for line in out.splitlines() if line.split("\t")[0] == topology.DEAD_LETTER_QUEUE).replace(" ", "")
    assert f'{{"x-max-length",{topology.DEAD_LETTER_MAX_LENGTH}}}' in line, line
    assert '{"x-overflow","drop-head"}' in line, line
    size = topology.BROKER_MAX_MESSAGE_SIZE - 4096
    n = topology.DEAD_LETTER_MAX_BYTES // size + 2  # two more than fit
    agg = connect(federation.aggregator_url)
    try:
        ch = agg.channel()
        ch.confirm_delivery()
        for i in range(n):
            ch.basic_publish(topology.DEAD_LETTER_EXCHANGE, "", b"\0" * size, pika.BasicProperties(headers={"n": i}))
        held = ch.queue_declare(topology.DEAD_LETTER_QUEUE, passive=True).method.message_count
        assert held * size <= topology.DEAD_LETTER_MAX_BYTES < (held + 1) * size, held
        method, props, _ = ch.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
        assert method is not None and props.headers["n"] == n - held, "the oldest copies are the ones dropped"
        ch.queue_purge(topology.DEAD_LETTER_QUEUE)
    finally:
        agg.close()
