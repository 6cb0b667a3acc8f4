"""When a site starts its next round: after a new version (sync, and the default), or as soon as
its last update is published (``train_continuously``: async, FedBuff's clients).

The real ``SiteAgent`` and ``SiteRuntime`` (CKKS, signing, DP-SGD on real image files) over the
in-memory ``StubBroker``; no aggregator runs, so no version ever arrives."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from fedmq.broker import topology
from fedmq.broker.transport import StubBroker
from fedmq.experiments.federation import FederationSpec
from integration.site_kit import make_site_kit
from fedmq.shared.codec import decode_update_chunk
from fedmq.site_agent.runtime import SiteRuntime
from fedmq.site_agent.service import SiteAgent
from testkit.polling import wait_until


def _wait(pred, what: str, timeout: float = 120.0) -> None:  # noqa: ANN001
    wait_until(pred, what, timeout)


def test_a_continuous_site_trains_again_without_a_new_version(tmp_path: Path) -> None:
    kit = make_site_kit(tmp_path / "kit")
    stub = StubBroker()
    stub.declare_all(topology.EXCHANGES, (*topology.aggregator_queue_specs(1), topology.site_queue_spec("alpha")))
    # retrain_after_s is an hour: only train_continuously can start rounds 2 and 3 here
    settings = kit.settings(join_wait_s=0.0, planned_rounds=3, train_continuously=True, retrain_after_s=3600.0,
                            reconnect_initial_s=0.05, amqp_url="amqp://alpha:unused@localhost/fedmq")
    agent = SiteAgent(settings, SiteRuntime.open(settings), connect=stub.connect("alpha"))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: agent.rt.state.updates_sent == 3, "three updates")
    finally:
        agent.stop()
        thread.join(60)
        agent.rt.dir_lock.release()
    chunks = [decode_update_chunk(m.body) for m in stub.messages(topology.updates_queue(0))]
    firsts = [c for c in chunks if c.chunk_index == 0]
    assert [c.update_id for c in firsts] == ["alpha:1", "alpha:2", "alpha:3"]
    assert {c.base_version for c in firsts} == {0}  # no version came: each round started from x_0
    assert agent.rt.state.version == 0


def test_continuous_rounds_are_refused_for_sync_federations(tmp_path: Path) -> None:
    """Sync refuses a second update per round: each would spend privacy budget for nothing."""
    with pytest.raises(ValueError, match="train_continuously is for async mode"):
        FederationSpec(workdir=tmp_path, data_npz=tmp_path / "x.npz", mode="sync", train_continuously=True)
    assert FederationSpec(workdir=tmp_path, data_npz=tmp_path / "x.npz", mode="async", train_continuously=True)


def test_local_steps_fix_the_compute_of_a_round_whatever_the_image_count(tmp_path: Path) -> None:
    from fedmq.site_agent.runtime import training_config

    kit = make_site_kit(tmp_path / "kit")
    by_steps = training_config(kit.settings(local_steps=5, batch_size=8))
    by_epochs = training_config(kit.settings(batch_size=8))
    assert [by_steps.steps_per_round(n) for n in (24, 1000)] == [5, 5]
    assert [by_epochs.steps_per_round(n) for n in (24, 1000)] == [3, 125]
