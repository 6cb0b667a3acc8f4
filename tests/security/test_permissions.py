"""Least privilege on a real broker: what each fedmq user must NOT be able to do, and that the
real services' operations still work with exactly the provisioned permissions."""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import pika.exceptions
import pytest

from fedmq.broker import provision, topology
from tests.security.helpers import ProvisionedVhost, connect

pytestmark = [pytest.mark.security, pytest.mark.broker]

ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406
AGG = provision.AGGREGATOR_USER


def _props(user_id: str | None, kind: str = "update-chunk") -> pika.BasicProperties:
    return pika.BasicProperties(user_id=user_id, type=kind, delivery_mode=pika.DeliveryMode.Persistent)


# Each attack: (who, action(channel, federation)). "site" = site A, "other" = site B's name.
def _consume(queue: Callable[[ProvisionedVhost], str]) -> Callable:
    return lambda ch, f: ch.basic_consume(queue(f), lambda *a: None)


def _get(queue: Callable[[ProvisionedVhost], str]) -> Callable:
    return lambda ch, f: ch.basic_get(queue(f))


def _publish(exchange: Callable[[ProvisionedVhost], str], key: Callable[[ProvisionedVhost], str], user: Callable[[ProvisionedVhost], str]) -> Callable:
    return lambda ch, f: ch.basic_publish(exchange(f), key(f), b"forged", _props(user(f)), mandatory=False)


UPDATES_Q = lambda f: topology.updates_queue(0)  # noqa: E731
SITE_A_Q = lambda f: topology.site_queue(f.site_a)  # noqa: E731
SITE_B_Q = lambda f: topology.site_queue(f.site_b)  # noqa: E731
SITE_A = lambda f: f.site_a  # noqa: E731
SITE_B = lambda f: f.site_b  # noqa: E731
CONST = lambda v: (lambda f: v)  # noqa: E731

REFUSED: list[tuple[str, str, Callable]] = [
    # a site must never see other sites' (ciphertext) updates
    ("site", "consume the updates queue", _consume(UPDATES_Q)),
    ("site", "basic.get from the updates queue", _get(UPDATES_Q)),
    ("site", "purge the updates queue", lambda ch, f: ch.queue_purge(topology.updates_queue(0))),
    ("site", "bind its own queue to the updates exchange",
     lambda ch, f: ch.queue_bind(topology.site_queue(f.site_a), topology.UPDATES_EXCHANGE, topology.shard_key(0))),
    # issue 15: no bindings at all (the admin bound its queue), no writes to the dead-letter exchange
    ("site", "bind its own queue to the global exchange",
     lambda ch, f: ch.queue_bind(topology.site_queue(f.site_a), topology.GLOBAL_EXCHANGE, "")),
    ("site", "publish to the dead-letter exchange", _publish(CONST(topology.DEAD_LETTER_EXCHANGE), CONST(""), SITE_A)),
    ("site", "re-declare its own queue (only the admin declares)",
     lambda ch, f: ch.queue_declare(topology.site_queue(f.site_a), durable=True, arguments=topology.site_queue_spec(f.site_a).arguments)),
    # nor another site's traffic
    ("site", "consume another site's queue", lambda ch, f: ch.basic_consume(topology.site_queue(f.site_b), lambda *a: None)),
    ("site", "consume the metrics queue", _consume(CONST(topology.METRICS_QUEUE))),
    ("site", "consume the dead-letter queue", _consume(CONST(topology.DEAD_LETTER_QUEUE))),
    # nor impersonate the aggregator
    ("site", "publish on the global fanout", _publish(CONST(topology.GLOBAL_EXCHANGE), CONST(""), SITE_A)),
    ("site", "publish on the site-direct exchange to another site", _publish(CONST(topology.SITE_DIRECT_EXCHANGE), SITE_B, SITE_A)),
    ("site", "publish via the default exchange into the updates queue", _publish(CONST(""), UPDATES_Q, SITE_A)),
    ("site", "publish via the default exchange into another site's queue", _publish(CONST(""), SITE_B_Q, SITE_A)),
    # nor reshape the topology
    ("site", "declare another site's queue",
     lambda ch, f: ch.queue_declare(topology.site_queue(f.site_b), durable=True, arguments=topology.site_queue_spec(f.site_b).arguments)),
    ("site", "declare an arbitrary queue", lambda ch, f: ch.queue_declare("fedmq.exfiltrate", durable=True)),
    ("site", "delete the updates queue", lambda ch, f: ch.queue_delete(topology.updates_queue(0))),
    ("site", "delete another site's queue", lambda ch, f: ch.queue_delete(topology.site_queue(f.site_b))),
    ("site", "declare (non-passively) the global exchange",
     lambda ch, f: ch.exchange_declare(topology.GLOBAL_EXCHANGE, "fanout", durable=True)),
    ("site", "delete the updates exchange", lambda ch, f: ch.exchange_delete(topology.UPDATES_EXCHANGE)),
    ("site", "declare its own exchange", lambda ch, f: ch.exchange_declare("fedmq.rogue", "fanout")),
    # the aggregator cannot forge site updates or read site queues
    ("aggregator", "publish to the updates exchange", _publish(CONST(topology.UPDATES_EXCHANGE), CONST(topology.shard_key(0)), CONST(AGG))),
    ("aggregator", "consume a site's queue", _consume(SITE_A_Q)),
    ("aggregator", "declare a site's queue",
     lambda ch, f: ch.queue_declare(topology.site_queue(f.site_b), durable=True, arguments=topology.site_queue_spec(f.site_b).arguments)),
]

FORGED_USER_ID: list[tuple[str, str, Callable]] = [
    ("site", "update claiming to come from another site", _publish(CONST(topology.UPDATES_EXCHANGE), CONST(topology.shard_key(0)), SITE_B)),
    ("site", "update claiming to come from the aggregator", _publish(CONST(topology.UPDATES_EXCHANGE), CONST(topology.shard_key(0)), CONST(AGG))),
    ("site", "snapshot request on behalf of another site",
     _publish(CONST(topology.CONTROL_EXCHANGE), CONST(topology.SNAPSHOT_REQUEST_KEY), SITE_B)),
    ("aggregator", "global version claiming to come from a site", _publish(CONST(topology.GLOBAL_EXCHANGE), CONST(""), SITE_A)),
]


def _user(federation: ProvisionedVhost, who: str) -> str:
    return federation.site_a if who == "site" else AGG


def _expect_closed(open_channel, federation: ProvisionedVhost, who: str, action: Callable, code: int) -> None:  # noqa: ANN001
    ch = open_channel(_user(federation, who))
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        action(ch, federation)
        # publishes are asynchronous: with confirms the broker answers (or closes) before we go on
        ch.queue_declare(topology.site_queue(federation.site_a), passive=True)
    assert info.value.reply_code == code, info.value.reply_text


@pytest.mark.parametrize(("who", "what", "action"), REFUSED, ids=[f"{w}: {d}" for w, d, _ in REFUSED])
def test_access_refused(federation: ProvisionedVhost, open_channel, who: str, what: str, action: Callable) -> None:  # noqa: ANN001
    _expect_closed(open_channel, federation, who, action, ACCESS_REFUSED)


#: every exchange.bind a site could try: each fedmq exchange as
#: destination, each as source. RabbitMQ needs write on the destination and read on the source;
#: a site has read on no exchange, so all are refused. Before issue 15 a site could bind e.g.
#: the dead-letter exchange to the global fanout, a durable amplifier that outlived it.
_EXCHANGE_NAMES = [e.name for e in topology.EXCHANGES]
EXCHANGE_BINDS = [(dst, src) for dst in _EXCHANGE_NAMES for src in _EXCHANGE_NAMES]


@pytest.mark.parametrize(("destination", "source"), EXCHANGE_BINDS, ids=[f"{d}<-{s}" for d, s in EXCHANGE_BINDS])
def test_site_cannot_bind_exchanges(federation: ProvisionedVhost, open_channel, destination: str, source: str) -> None:  # noqa: ANN001
    action = lambda ch, f: ch.exchange_bind(destination=destination, source=source, routing_key="")  # noqa: E731
    _expect_closed(open_channel, federation, "site", action, ACCESS_REFUSED)


@pytest.mark.parametrize(("who", "what", "action"), FORGED_USER_ID, ids=[f"{w}: {d}" for w, d, _ in FORGED_USER_ID])
def test_forged_user_id_is_rejected(federation: ProvisionedVhost, open_channel, who: str, what: str, action: Callable) -> None:  # noqa: ANN001
    _expect_closed(open_channel, federation, who, action, PRECONDITION_FAILED)


def test_site_passive_declares_see_the_topology(federation: ProvisionedVhost, open_channel) -> None:  # noqa: ANN001
    """Sites rely on the exchanges passively; a passive declare needs no permission."""
    ch = open_channel(federation.site_a)
    for ex in topology.EXCHANGES:
        ch.exchange_declare(ex.name, ex.type, passive=True)


def _drain(conn: pika.BlockingConnection, ch, queue: str, n: int, timeout: float = 10.0) -> list:  # noqa: ANN001
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            conn.process_data_events(time_limit=0.1)
            continue
        got.append((props, body))
    return got


def test_site_and_aggregator_positive_path(federation: ProvisionedVhost) -> None:
    """The operations the real services perform all succeed with least privilege, end to end."""
    site_b = federation.site_b
    agg = connect(federation.aggregator_url)
    site = connect(federation.url(site_b))
    try:
        # aggregator: declares the exchanges and its queues (idempotent re-declare), binds them
        agg_ch = agg.channel()
        agg_ch.confirm_delivery()
        topology.declare(agg_ch, topology.EXCHANGES, topology.aggregator_queue_specs(1))

        # site B: checks its (admin-declared) queue exactly as the site agent does, consumes it
        site_ch = site.channel()
        site_ch.confirm_delivery()
        spec = topology.site_queue_spec(site_b)
        topology.check_declared(site_ch, (spec,))
        site_ch.basic_qos(prefetch_count=8)

        # site B publishes an update chunk, a snapshot request and metrics with its own user_id
        for exchange, key, kind in (
            (topology.UPDATES_EXCHANGE, topology.shard_key(0), "update-chunk"),
            (topology.CONTROL_EXCHANGE, topology.SNAPSHOT_REQUEST_KEY, "snapshot-request"),
            (topology.CONTROL_EXCHANGE, topology.METRICS_KEY, "site-metrics"),
        ):
            site_ch.basic_publish(exchange, key, f"{kind} from {site_b}".encode(), _props(site_b, kind), mandatory=True)

        # aggregator consumes them and sees the broker-validated user_id
        for queue, kind in (
            (topology.updates_queue(0), "update-chunk"),
            (topology.SNAPSHOT_REQUESTS_QUEUE, "snapshot-request"),
            (topology.METRICS_QUEUE, "site-metrics"),
        ):
            got = _drain(agg, agg_ch, queue, 1)
            assert len(got) == 1, f"nothing arrived in {queue}"
            assert got[0][0].user_id == site_b and got[0][0].type == kind

        # aggregator broadcasts on the fanout, answers on site-direct, dead-letters with reason
        agg_ch.basic_publish(topology.GLOBAL_EXCHANGE, "", b"global v1", _props(provision.AGGREGATOR_USER, "global-version"), mandatory=True)
        agg_ch.basic_publish(topology.SITE_DIRECT_EXCHANGE, site_b, b"snapshot", _props(provision.AGGREGATOR_USER, "snapshot"), mandatory=True)
        agg_ch.basic_publish(
            topology.DEAD_LETTER_EXCHANGE, "", b"bad", pika.BasicProperties(headers={topology.REASON_HEADER: "test"}), mandatory=True
        )
        assert len(_drain(agg, agg_ch, topology.DEAD_LETTER_QUEUE, 1)) == 1

        # site B receives the broadcast and the direct message by consuming its own queue
        received: list[bytes] = []
        site_ch.basic_consume(spec.name, lambda ch, m, p, body: (received.append(body), ch.basic_ack(m.delivery_tag)))
        deadline = time.monotonic() + 10
        while len(received) < 2 and time.monotonic() < deadline:
            site.process_data_events(time_limit=0.2)
        assert sorted(received) == [b"global v1", b"snapshot"]

        # site A's pre-declared queue got the broadcast too (fanout reaches every site)
        site_a = connect(federation.url(federation.site_a))
        try:
            a_ch = site_a.channel()
            topology.check_declared(a_ch, (topology.site_queue_spec(federation.site_a),))
            assert [b for _, b in _drain(site_a, a_ch, topology.site_queue(federation.site_a), 1)] == [b"global v1"]
        finally:
            site_a.close()
    finally:
        for c in (agg, site):
            if c.is_open:
                c.close()


def test_permissions_on_the_broker_match_the_plan(federation: ProvisionedVhost, broker) -> None:  # noqa: ANN001
    """What rabbitmqctl reports is exactly what provision computed (no wildcard crept in)."""
    out = broker.rabbitmqctl("list_permissions", "-p", federation.namespace.vhost, "--no-table-headers")
    actual = provision.parse_list_permissions(out)
    assert actual[provision.AGGREGATOR_USER] == provision.aggregator_permissions(1)
    assert actual[federation.site_a] == provision.site_permissions(federation.site_a)
    assert actual[federation.site_b] == provision.site_permissions(federation.site_b)


def test_site_permission_regexes_do_not_overlap_other_sites() -> None:
    """Anchored and escaped: hospital_1's rights never match hospital_10's or a look-alike's names."""
    import re

    p = provision.site_permissions("hospital_1")
    for other in ("hospital_10", "hospital_1x", "xhospital_1"):
        for regex in p.as_tuple():
            assert not re.fullmatch(regex, topology.site_queue(other))
    assert re.search(p.read, topology.site_queue("hospital_1"))
    assert not re.search(p.read, topology.updates_queue(0))
    assert not re.search(p.read, topology.UPDATES_EXCHANGE)
    assert not re.search(p.write, topology.GLOBAL_EXCHANGE)
    assert not re.search(p.write, topology.DEAD_LETTER_EXCHANGE)
    assert p.configure == provision.NOTHING
    for exchange in topology.EXCHANGES:  # read on an exchange would make it a binding source
        assert not re.search(p.read, exchange.name)
