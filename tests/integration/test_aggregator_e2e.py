"""The aggregator end to end on a real broker: sites publish encrypted updates, the test decrypts
the versions the aggregator publishes and compares them with a plaintext FedBuff replay."""

from __future__ import annotations

import numpy as np
import pytest

from fedmq.broker.topology import CONTROL_EXCHANGE, METRICS_KEY, SNAPSHOT_REQUEST_KEY
from integration.aggregator_helpers import (
    AggregatorThread, GlobalListener, PlainReplay, declare_topology, make_federation, publish, random_delta,
)
from fedmq.shared.codec import encode_site_metrics, encode_snapshot_request
from fedmq.shared.schema import SiteMetrics, SnapshotRequest

pytestmark = pytest.mark.broker


def test_one_site_one_update(tmp_path, amqp_url):
    fed = make_federation(tmp_path, sites=("alpha",))
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url)
    listener = GlobalListener(amqp_url)
    try:
        with AggregatorThread(settings) as agg:
            delta = random_delta(np.random.default_rng(1), fed.n_params)
            bodies, sent = fed.update("alpha", 1, 0, delta)
            publish(amqp_url, bodies)
            v = listener.wait_for(lambda v: v["version"] == 1 and v["mode"] == "delta")
            assert [c.update_id for c in v["contributors"]] == ["alpha:1"]
            units = v["contributors"][0].weight_units
            assert units == 64
            plain = PlainReplay()
            plain.fold(sent, units)
            got = fed.model(v["blocks"], v["value_scale"])
            np.testing.assert_allclose(got, plain.model(fed.n_params, v["value_scale"]), atol=1e-6)
            assert np.allclose(got, delta, atol=1e-6)  # one update, w = w_ref, lr 1: x_1 = x_0 + delta
            assert agg.engine.version == 1
    finally:
        listener.close()


def _replay_versions(fed, versions, sent_by_uid):
    """Plaintext FedBuff replay driven by the contributors each delta names; checks every version."""
    from fedmq.aggregator.fold import weight_units

    plain = PlainReplay()
    for v in sorted((v for v in versions if v["mode"] == "delta"), key=lambda v: v["version"]):
        for c in v["contributors"]:
            assert c.weight_units == weight_units(c.staleness, c.sample_weight, quantum=64, exponent=0.5,
                                                  reference_sample_weight=1.0)
            plain.fold(sent_by_uid[c.update_id], c.weight_units)
        assert v["weight_units_sum"] == sum(c.weight_units for c in v["contributors"])
        blocks = dict(v["blocks"])
        got = fed.decrypt(blocks)
        for i, values in got.items():
            np.testing.assert_allclose(values, plain.D[i], atol=1e-6 / v["value_scale"])
    return plain


@pytest.mark.slow
def test_three_sites_async_at_different_speeds(tmp_path, amqp_url):
    fed = make_federation(tmp_path)
    settings = fed.settings(amqp_url=amqp_url, buffer_size=3, max_staleness=8, snapshot_every=2,
                            reference_sample_weight=1.0)  # pinned: the replay checks the unit formula exactly
    declare_topology(amqp_url)
    listener = GlobalListener(amqp_url, site="alpha")
    rng = np.random.default_rng(11)
    period = {"alpha": 1, "bravo": 2, "charlie": 3}
    weight = {"alpha": 1.0, "bravo": 2.5, "charlie": 0.7}
    started_from = {s: 0 for s in fed.sites}
    seq = {s: 0 for s in fed.sites}
    sent_by_uid, n_sent = {}, 0
    try:
        with AggregatorThread(settings) as agg:
            for tick in range(1, 10):
                for site in fed.sites:
                    if tick % period[site]:
                        continue
                    seq[site] += 1
                    mode = "topk" if site == "bravo" else "dense"
                    bodies, sent = fed.update(site, seq[site], started_from[site], random_delta(rng, fed.n_params),
                                              sample_weight=weight[site], mode=mode)
                    publish(amqp_url, bodies)
                    sent_by_uid[f"{site}:{seq[site]}"] = sent
                    n_sent += 1
                    listener.poll(0.3)
                    seen = max([v["version"] for v in listener.versions], default=0)
                    started_from[site] = seen  # the site starts its next local training from here
            expected_versions = n_sent // 3
            listener.wait_for(lambda v: v["version"] == expected_versions and v["mode"] == "delta")
            assert agg.engine.version == expected_versions
            deltas = [v for v in listener.versions if v["mode"] == "delta"]
            assert sorted(v["version"] for v in deltas) == list(range(1, expected_versions + 1))
            stalenesses = [c.staleness for v in deltas for c in v["contributors"]]
            assert max(stalenesses) >= 1, "slow sites must have produced stale updates"
            plain = _replay_versions(fed, listener.versions, sent_by_uid)
            # snapshots (every 2 versions) carry the full state of their version
            snap = listener.wait_for(lambda v: v["mode"] == "snapshot" and v["version"] == 2)
            assert snap["version"] == 2
            # snapshot on request, addressed to one site
            publish(amqp_url, [encode_snapshot_request(SnapshotRequest(site_id="alpha", have_version=0, reason="gap"))],
                    exchange=CONTROL_EXCHANGE, routing_key=SNAPSHOT_REQUEST_KEY)
            direct = listener.wait_for(lambda v: v["target_site"] == "alpha")
            np.testing.assert_allclose(fed.model(direct["blocks"], direct["value_scale"]),
                                       plain.model(fed.n_params, direct["value_scale"]), atol=1e-6)
            # site metrics end up in status.json
            publish(amqp_url, [encode_site_metrics(SiteMetrics(
                site_id="bravo", version=expected_versions, auc=0.81, n_val=100, epsilon_spent=1.5,
                epsilon_target=8.0, updates_sent=seq["bravo"], timestamp=0.0))],
                exchange=CONTROL_EXCHANGE, routing_key=METRICS_KEY)
            import json
            import time
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                st = json.loads((settings.state_dir / "status.json").read_text())
                if st["sites"]["bravo"].get("auc") == 0.81:
                    break
                time.sleep(0.2)
            assert st["sites"]["bravo"]["epsilon_spent"] == 1.5
            assert st["version"] == expected_versions
    finally:
        listener.close()


def test_sync_fedavg_mode(tmp_path, amqp_url):
    from integration.aggregator_helpers import drain_dead_letters

    fed = make_federation(tmp_path)
    settings = fed.settings(amqp_url=amqp_url, mode="sync")
    declare_topology(amqp_url)
    listener = GlobalListener(amqp_url)
    rng = np.random.default_rng(2)
    plain = PlainReplay()
    try:
        with AggregatorThread(settings) as agg:
            assert agg.engine.K == 3
            for rnd in range(2):
                for i, site in enumerate(fed.sites):
                    bodies, sent = fed.update(site, 2 * rnd + 1, rnd, random_delta(rng, fed.n_params))
                    publish(amqp_url, bodies)
                    plain.fold(sent, 64)
                    if i == 0:  # a second update in the same round is refused
                        extra, _ = fed.update(site, 2 * rnd + 2, rnd, random_delta(rng, fed.n_params))
                        publish(amqp_url, extra)
                v = listener.wait_for(lambda v, r=rnd: v["version"] == r + 1)
                assert {c.site_id for c in v["contributors"]} == set(fed.sites)
            stale, _ = fed.update("bravo", 10, 0, random_delta(rng, fed.n_params))
            publish(amqp_url, stale)
            reasons = [h["x-fedmq-reason"] for h, _ in drain_dead_letters(amqp_url, 3)]
            assert reasons.count("duplicate-round") == 2 and "too-stale" in reasons
            v2 = listener.wait_for(lambda v: v["version"] == 2)
            np.testing.assert_allclose(fed.model(v2["blocks"], v2["value_scale"]),
                                       plain.model(fed.n_params, v2["value_scale"]), atol=1e-6)
    finally:
        listener.close()
