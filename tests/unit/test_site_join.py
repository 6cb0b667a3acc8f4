"""A site with no state trains only after the aggregator answered its start request.

Before: a fresh site waited ``join_wait_s`` for an answer and then trained from x_0; a late
joiner whose snapshot came later spent a round of budget on an update refused as too stale.
Now the aggregator answers every start request (a snapshot, or ``no-version-yet`` at version 0)
and the site asks again until it has the answer.

The real ``AggregatorService`` and ``SiteAgent`` (CKKS, signatures, audit chain, DP-SGD on real
image files) over the in-memory ``StubBroker``."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from fedmq.aggregator.consumer import AggregatorService
from fedmq.broker import topology
from fedmq.broker.transport import StubBroker
from integration.aggregator_helpers import make_federation, random_delta
from integration.site_kit import make_site_kit
from fedmq.shared.codec import decode
from fedmq.shared.schema import SnapshotRequest
from fedmq.shared.signing import AGGREGATOR_KEY_NAME, private_key_path, public_key_path
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.runtime import SiteRuntime
from fedmq.site_agent.service import SiteAgent
from testkit.polling import wait_until


def _wait(pred, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    wait_until(pred, what, timeout)


class _Running:
    """A service's ``run`` on a thread, stopped and joined on exit."""

    def __init__(self, service: AggregatorService | SiteAgent) -> None:
        self.service = service
        self.thread = threading.Thread(target=service.run, daemon=True)

    def __enter__(self) -> "_Running":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


def _setup(tmp_path: Path, join_wait_s: float):  # noqa: ANN202
    layout = FederatedModel.create("small_cnn", 0).layout
    fed = make_federation(tmp_path / "fed", sites=("alpha", "bravo"), n_params=layout.size)
    kit = make_site_kit(tmp_path / "kit")
    site = kit.settings(
        secret_context=fed.keys_dir / "site-secret.ckks", signing_key=private_key_path(fed.site_keys_dir, "alpha"),
        aggregator_public_key=public_key_path(fed.keys_dir, AGGREGATOR_KEY_NAME), join_wait_s=join_wait_s,
        planned_rounds=1, retrain_after_s=3600.0, reconnect_initial_s=0.05, init_seed=0,
        amqp_url="amqp://alpha:unused@localhost/fedmq",
    )
    stub = StubBroker()
    stub.declare_all(topology.EXCHANGES, (*topology.aggregator_queue_specs(1), topology.site_queue_spec("alpha")))
    agg = fed.settings(tmp_path / "agg", buffer_size=1, reconnect_initial_s=0.05, reconnect_max_s=0.1)
    return fed, layout, site, stub, agg


def test_at_version_zero_the_answer_starts_the_site(tmp_path: Path) -> None:
    """join_wait_s is an hour: only the aggregator's "no version yet" can start the first round."""
    fed, layout, settings, stub, agg = _setup(tmp_path, join_wait_s=3600.0)
    agent = SiteAgent(settings, SiteRuntime.open(settings), connect=stub.connect("alpha"))
    try:
        with _Running(AggregatorService(agg, connect=stub.connect("fedmq-aggregator"))) as a:
            with _Running(agent):
                _wait(lambda: a.service.engine.version == 1, "alpha's update folded into version 1")
            folded = a.service.engine.sites["alpha"]
    finally:
        agent.rt.dir_lock.release()
    assert (folded.updates_folded, folded.last_base_version, folded.rejected) == (1, 0, {})


def test_a_late_joiner_trains_only_from_the_snapshot(tmp_path: Path) -> None:
    """The federation is at version 2 and its aggregator is down when the site starts: the site
    asks again instead of training from x_0, and its first update starts from version 2."""
    fed, layout, settings, stub, agg = _setup(tmp_path, join_wait_s=0.2)
    rng = np.random.default_rng(3)
    with _Running(AggregatorService(agg, connect=stub.connect("fedmq-aggregator"))) as first:
        for seq in (1, 2):
            bodies, _ = fed.update("bravo", seq, seq - 1, random_delta(rng, fed.n_params, 0.01), layout_fp=layout.fingerprint)
            for b in bodies:
                stub.route(topology_message(b))
            _wait(lambda seq=seq: first.service.engine.version == seq, f"version {seq}")
    agent = SiteAgent(settings, SiteRuntime.open(settings), connect=stub.connect("alpha"))
    try:
        with _Running(agent):
            def asked() -> int:
                return sum(isinstance(decode(m.body), SnapshotRequest) for m in stub.messages(topology.SNAPSHOT_REQUESTS_QUEUE))

            _wait(lambda: asked() >= 3, "the site to ask again while the aggregator is down")
            assert agent.rt.state.updates_sent == 0  # asked three times, trained not once
            with _Running(AggregatorService(agg, connect=stub.connect("fedmq-aggregator"))) as second:
                _wait(lambda: second.service.engine.version == 3, "alpha's update folded into version 3")
                folded = second.service.engine.sites["alpha"]
    finally:
        agent.rt.dir_lock.release()
    # its one update (planned_rounds = 1) started from the snapshot of version 2: staleness 0
    assert (folded.updates_folded, folded.last_base_version, folded.last_staleness) == (1, 2, 0)
    assert folded.rejected == {}


def topology_message(body: bytes):  # noqa: ANN201
    from fedmq.broker.transport import Message

    return Message(topology.UPDATES_EXCHANGE, topology.shard_key(0), body, kind="update-chunk")
