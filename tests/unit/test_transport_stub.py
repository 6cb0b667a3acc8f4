"""The transport seam without a broker: the real ``AggregatorService`` driven over the in-memory
``StubBroker`` (Dramatiq's StubBroker pattern). The same service code runs on RabbitMQ in
tests/integration; here a dropped link, redelivery, dead-lettering, intents and the 403
fail-fast are exercised in a second or two."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.consumer import AggregatorService
from fedmq.aggregator.engine import Intent
from fedmq.aggregator.publisher import route
from fedmq.broker import topology
from fedmq.broker.connection import AuthRefusals, Backoff, BrokerAuthenticationError
from fedmq.broker.transport import Message, QueueMissing, StubBroker, run_reconnecting
from integration.aggregator_helpers import PlainReplay, make_federation, random_delta
from fedmq.shared.codec import decode_global_version
from fedmq.shared.errors import BrokerConnectionError
from testkit.polling import wait_until

OBSERVER = topology.QueueSpec("observer", bindings=((topology.GLOBAL_EXCHANGE, ""),))


def _wait(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    wait_until(pred, what, timeout, interval=0.02)


def _publish(stub: StubBroker, bodies: list[bytes]) -> None:
    for b in bodies:
        stub.route(Message(topology.UPDATES_EXCHANGE, topology.shard_key(0), b, kind="update-chunk"))


def test_intents_map_onto_topology_names() -> None:
    assert route(Intent.VERSION_TO_ALL) == (topology.GLOBAL_EXCHANGE, "")
    assert route(Intent.TO_SITE, "bravo") == (topology.SITE_DIRECT_EXCHANGE, "bravo")
    assert route(Intent.DEAD_LETTER) == (topology.DEAD_LETTER_EXCHANGE, "")
    with pytest.raises(ValueError):
        route(Intent.TO_SITE)


def test_aggregator_over_stub_broker_survives_a_dropped_link(tmp_path: Path) -> None:
    """Every update is folded exactly once across a dropped link (unacked ones redelivered), the
    versions reach the fanout, and a poison message is dead-lettered with its reason."""
    fed = make_federation(tmp_path, sites=("alpha", "bravo"))
    stub = StubBroker()
    stub.declare_all(topology.EXCHANGES, (*topology.aggregator_queue_specs(1), OBSERVER))
    settings = fed.settings(tmp_path / "agg", buffer_size=2, reconnect_initial_s=0.01, reconnect_max_s=0.05)
    svc = AggregatorService(settings, connect=stub.connect("fedmq-aggregator"))
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    rng = np.random.default_rng(5)
    replay = PlainReplay()
    try:
        assert svc.ready.wait(30)
        for seq, site in ((1, "alpha"), (1, "bravo")):
            bodies, sent = fed.update(site, seq, 0, random_delta(rng, fed.n_params))
            replay.fold(sent, 64)
            _publish(stub, bodies)
        _wait(lambda: svc.engine.version == 1, "version 1")
        stub.drop_links()  # as after a broker restart: the service reconnects through the shared loop
        _wait(lambda: svc.connections >= 2 and svc.ready.is_set(), "a reconnect")
        for seq, site in ((2, "alpha"), (2, "bravo")):
            bodies, sent = fed.update(site, seq, 1, random_delta(rng, fed.n_params))
            replay.fold(sent, 64)
            _publish(stub, bodies)
        _publish(stub, [b"\x00not msgpack"])
        _wait(lambda: svc.engine.version == 2, "version 2")
        _wait(lambda: len(stub.messages(topology.DEAD_LETTER_QUEUE)) == 1, "a dead-letter copy")
    finally:
        svc.stop()
        thread.join(30)
    assert not thread.is_alive()
    ids = sorted(u for _, us in svc.engine.recent for u in us)
    assert ids == ["alpha:1", "alpha:2", "bravo:1", "bravo:2"]
    versions = [decode_global_version(m.body, max_bytes=1 << 30) for m in stub.messages("observer")]
    assert sorted({v.version for v in versions}) == [1, 2] and all(m.kind == "delta" for m in stub.messages("observer"))
    dead = stub.messages(topology.DEAD_LETTER_QUEUE)[0]
    assert dead.headers and dead.headers[topology.REASON_HEADER] and dead.body == b"\x00not msgpack"
    # the folded ciphertexts equal the plaintext replay (exactly once, after the reconnect)
    model = fed.model(svc.engine.D.data, svc.engine.value_scale)
    assert np.max(np.abs(model - replay.model(fed.n_params, svc.engine.value_scale))) < 1e-3


def test_repeated_403_ends_the_service(tmp_path: Path) -> None:
    fed = make_federation(tmp_path, sites=("alpha",))
    stub = StubBroker()
    stub.refuse_logins = True
    settings = fed.settings(tmp_path / "agg", reconnect_initial_s=0.01, reconnect_max_s=0.02)
    svc = AggregatorService(settings, connect=stub.connect("wrong"))
    with pytest.raises(BrokerAuthenticationError, match="giving up after 3 refusals"):
        svc.run()


def test_reconnect_loop_retries_then_passes_fatal_errors_through() -> None:
    stop = threading.Event()
    calls: list[str] = []

    class Fatal(Exception):
        pass

    def session() -> None:
        calls.append("s")
        if len(calls) < 3:
            raise BrokerConnectionError("lost")
        if len(calls) == 3:
            raise QueueMissing("queue missing: x")  # a BrokerConnectionError too: retried
        raise Fatal()

    with pytest.raises(Fatal):
        run_reconnecting(session, stop=stop, backoff=Backoff(0.001, 0.002), auth=AuthRefusals(), what="t", fatal=(Fatal,))
    assert len(calls) == 4


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(initial_s=0.5, max_s=2.0)
    delays = [b.next_delay() for _ in range(20)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 1
