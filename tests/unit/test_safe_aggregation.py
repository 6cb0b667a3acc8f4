"""Issue 18, finding 1: the server step must never scale with a hospital's image count.

With the shipped aggregator config (no ``reference_sample_weight``) and sites reporting
thousands of samples, a version's step must be a weighted mean of the updates (times
server_lr), not the weighted *sum* scaled by the image count that diverged the pilot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.engine import AggregatorEngine
from fedmq.aggregator.policy import Policy
from fedmq.aggregator.settings import AggregatorSettings
from integration.aggregator_helpers import make_federation
from fedmq.shared.codec import decode_global_version
from fedmq.shared.settings import load_settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("fed"))


def test_server_step_is_a_weighted_mean_with_hospital_sized_weights(fed, tmp_path):
    """Three hospitals report 1,800 / 2,000 / 2,400 images: the step stays the size of one update."""
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=3))
    weights = {"alpha": 1800.0, "bravo": 2000.0, "charlie": 2400.0}
    value = {"alpha": 0.010, "bravo": 0.020, "charlie": 0.030}
    out = []
    for site in fed.sites:
        bodies, _ = fed.update(site, 1, 0, np.full(fed.n_params, value[site]), sample_weight=weights[site])
        for b in bodies:
            out += eng.handle_chunk(b)[1]
    assert eng.version == 1
    head = decode_global_version(out[0].body, max_bytes=1 << 30)
    model = fed.model({i: eng.D.data[i] for i in eng.D.data}, head.value_scale)
    expected = sum(weights[s] * value[s] for s in fed.sites) / sum(weights.values())
    # w_ref is the running mean of the weights reported so far (order-dependent by a few percent),
    # weight units are rounded integers (Q = 64): the step is the weighted mean within 10%
    assert np.max(np.abs(model - expected)) < 0.1 * expected, (float(model.max()), expected)
    eng.close()


@pytest.mark.parametrize("weights", [(1.0, 1.0), (5000.0, 5000.0), (10.0, 90_000.0)])
def test_weight_factor_is_bounded_by_the_number_of_sites(weights):
    """Whatever the reported counts, sum of units over one update per site is about Q * n_sites."""
    s = AggregatorSettings(public_context="x", site_keys_dir="y")
    policy = Policy(mode="async", buffer_size=2, staleness_exponent=0.5, max_staleness=16,
                    weight_quantum=s.weight_quantum, reference_sample_weight=s.reference_sample_weight)
    for i, w in enumerate(weights):
        policy.note_reported(f"s{i}", w)
    units = [policy.admit(site_id=f"s{i}", base_version=0, current_version=0, sample_weight=w).weight_units
             for i, w in enumerate(weights)]
    assert sum(units) <= s.weight_quantum * len(weights) + len(weights)
    assert max(units) <= s.weight_quantum * len(weights)


def test_shipped_aggregator_config_cannot_scale_the_step():
    settings = load_settings(AggregatorSettings, REPO / "deploy" / "config" / "aggregator.toml")
    assert settings.reference_sample_weight is None
    assert settings.server_lr <= 1.0
