"""Admission policy: async FedBuff staleness rules and the synchronous FedAvg baseline."""

from __future__ import annotations

import pytest

from fedmq.aggregator.policy import DuplicateRound, Policy
from fedmq.shared.errors import FutureBaseVersion, TooStale


def _policy(mode="async", **kw):
    base = dict(mode=mode, buffer_size=3, staleness_exponent=0.5, max_staleness=4, weight_quantum=64,
                reference_sample_weight=1.0, sites=frozenset({"a", "b"}))
    base.update(kw)
    return Policy(**base)


def test_async_weights_and_limits():
    p = _policy()
    assert p.admit(site_id="a", base_version=5, current_version=5, sample_weight=1.0).weight_units == 64
    adm = p.admit(site_id="a", base_version=2, current_version=5, sample_weight=1.0)
    assert adm.staleness == 3 and adm.weight_units == 32
    assert p.admit(site_id="a", base_version=1, current_version=5, sample_weight=2.0).weight_units == round(128 / 5 ** 0.5)
    with pytest.raises(TooStale) as e:
        p.admit(site_id="a", base_version=0, current_version=5, sample_weight=1.0)
    assert e.value.reason == "too-stale"
    with pytest.raises(FutureBaseVersion) as e:
        p.admit(site_id="a", base_version=6, current_version=5, sample_weight=1.0)
    assert e.value.reason == "future-version"
    assert p.commit_after == 3 and not p.commit_due(2, set()) and p.commit_due(3, set())


def test_sync_mode_rounds():
    p = _policy("sync")
    assert p.commit_after == 2
    assert p.admit(site_id="a", base_version=5, current_version=5, sample_weight=1.0).staleness == 0
    with pytest.raises(TooStale):
        p.admit(site_id="a", base_version=4, current_version=5, sample_weight=1.0)
    with pytest.raises(DuplicateRound) as e:
        p.admit(site_id="a", base_version=5, current_version=5, sample_weight=1.0, round_sites={"a"})
    assert e.value.reason == "duplicate-round"
    assert not p.commit_due(1, {"a"}) and p.commit_due(2, {"a", "b"})
