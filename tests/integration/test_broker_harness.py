"""The broker harness against a real broker: durability across a restart, vhost isolation, and
the error users see when no broker can be found."""

from __future__ import annotations

import time
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import pytest

from testkit import broker as harness
from testkit.broker import Broker, BrokerUnavailableError, open_test_broker, url_with_vhost

MESSAGES = 200


def _connect(url: str) -> pika.BlockingConnection:
    params = pika.URLParameters(url)
    params.connection_attempts = 5
    params.retry_delay = 1
    return pika.BlockingConnection(params)


def _drain(url: str, queue: str, expected: int, timeout: float = 60.0) -> list[bytes]:
    """Consume (and ack) until ``expected`` messages arrived and a quiet second followed."""
    bodies: list[bytes] = []
    connection = _connect(url)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=50)

        def on_message(ch, method, _properties, body: bytes) -> None:  # type: ignore[no-untyped-def]
            bodies.append(body)
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume(queue, on_message)
        deadline = time.monotonic() + timeout
        while len(bodies) < expected and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.5)
        connection.process_data_events(time_limit=1.0)  # anything beyond `expected` is a duplicate
        left = channel.queue_declare(queue, passive=True).method.message_count
        assert left == 0, f"{left} messages still in {queue}"
    finally:
        connection.close()
    return bodies


@pytest.mark.broker
@pytest.mark.slow
def test_quorum_queue_keeps_confirmed_messages_across_restart(broker_ctl: Broker, amqp_url: str) -> None:
    queue = "durability-probe"
    sent = [f"message-{i:04d}".encode() for i in range(MESSAGES)]
    connection = _connect(amqp_url)
    try:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        channel.confirm_delivery()
        for body in sent:
            # With confirms on, a nack or an unroutable (mandatory) message raises here.
            channel.basic_publish(
                "",
                queue,
                body,
                properties=pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent),
                mandatory=True,
            )
    finally:
        connection.close()

    started = time.monotonic()
    broker_ctl.restart()
    restart_seconds = time.monotonic() - started
    node = broker_ctl.node
    if node is not None:
        print(f"private node: boot {node.last_start_seconds:.2f}s within a {restart_seconds:.2f}s restart")

    received = _drain(amqp_url, queue, MESSAGES)
    assert len(received) == MESSAGES, f"got {len(received)} of {MESSAGES}"
    assert received == sent  # exactly once, unchanged, and (single publisher, one queue) in order


@pytest.mark.broker
def test_namespaces_are_isolated_and_dropped(broker: Broker, amqp_url: str) -> None:
    other = broker.new_namespace("other test")
    try:
        if other.isolation == "prefix":
            pytest.skip("external broker without rabbitmqctl: isolation is by name prefix only")
        assert unquote(urlsplit(amqp_url).path[1:]) != other.vhost
        with _connect(amqp_url) as mine:
            mine.channel().queue_declare("shared-name", durable=True)
        with _connect(other.url) as theirs:
            channel = theirs.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as excinfo:
                channel.queue_declare("shared-name", passive=True)
            assert excinfo.value.reply_code == 404
    finally:
        broker.drop_namespace(other)
    assert other.vhost not in broker.rabbitmqctl("list_vhosts", "--no-table-headers").splitlines()


@pytest.mark.broker
def test_retired_namespaces_are_deleted_in_one_call_when_the_broker_closes(broker: Broker) -> None:
    """Per-test vhosts are made ahead in batches and retired, then deleted together at close,
    with the ones never handed out (for any broker the harness did not start itself; a private
    node goes whole). Driven through the session broker's own rabbitmqctl, seen as an external
    broker whose node we can administer."""
    if not broker.can_rabbitmqctl:
        pytest.skip(f"{broker!r} cannot be administered with rabbitmqctl")
    calls: list[tuple[str, ...]] = []

    def ctl(*args: str) -> str:
        calls.append(args)
        return broker.rabbitmqctl(*args)

    external = Broker(broker.url, source="env", ctl=ctl)
    spaces = [external.new_namespace("retire me"), external.new_namespace('odd "name"')]
    assert [c[0] for c in calls] == ["eval"]  # a batch of vhosts, each with its permission, in one call
    assert len({ns.vhost for ns in spaces}) == 2
    batch = spaces[0].vhost.rsplit("-", 1)[0]
    made = [v for v in broker.rabbitmqctl("list_vhosts", "--no-table-headers").splitlines() if v.startswith(batch)]
    assert len(made) == external.VHOST_BATCH > len(spaces)
    for ns in spaces:
        with _connect(ns.url) as conn:  # the URL's user may use it
            conn.channel().queue_declare("probe", durable=True)
        external.retire_namespace(ns)
    listed = broker.rabbitmqctl("list_vhosts", "--no-table-headers").splitlines()
    assert all(ns.vhost in listed for ns in spaces), "retired, not yet deleted"
    external.close()
    assert len(calls) == 2, calls
    listed = broker.rabbitmqctl("list_vhosts", "--no-table-headers").splitlines()
    assert not any(v.startswith(batch) for v in listed), "retired and never handed out: all deleted"


@pytest.mark.broker
def test_external_url_without_rabbitmqctl_uses_a_unique_prefix(broker: Broker) -> None:
    external = open_test_broker({harness.ENV_AMQP_URL: broker.url})
    first, second = external.new_namespace("t"), external.new_namespace("t")
    assert (first.isolation, first.url) == ("prefix", broker.url)
    assert first.prefix and first.prefix != second.prefix
    assert not external.can_restart and not external.can_rabbitmqctl
    external.drop_namespace(first)  # nothing to delete; must not fail


def test_vhost_names_are_percent_encoded() -> None:
    url = url_with_vhost("amqps://u%40x:p@host:5671/%2F?heartbeat=10", "fedmq-test/a b-1")
    assert url == "amqps://u%40x:p@host:5671/fedmq-test%2Fa%20b-1?heartbeat=10"
    assert pika.URLParameters(url).virtual_host == "fedmq-test/a b-1"


def test_clear_error_when_no_broker_can_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "find_rabbitmq_install", lambda: None)
    monkeypatch.setattr(harness, "docker_engine_available", lambda *args, **kwargs: False)
    with pytest.raises(BrokerUnavailableError) as excinfo:
        open_test_broker(env={})
    message = str(excinfo.value)
    for hint in ("apt-get install rabbitmq-server", "Docker", harness.ENV_AMQP_URL):
        assert hint in message

