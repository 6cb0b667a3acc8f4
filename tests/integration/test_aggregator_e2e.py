"""The aggregator end to end on a real broker: sites publish encrypted updates, the test decrypts
the versions the aggregator publishes and compares them with a plaintext FedBuff replay."""

from __future__ import annotations

import numpy as np
import pytest

from broker.topology import CONTROL_EXCHANGE, METRICS_KEY, SNAPSHOT_REQUEST_KEY
from integration.aggregator_helpers import (
    AggregatorThread, GlobalListener, PlainReplay, declare_topology, make_federation, publish, random_delta,
)
from shared.codec import encode_site_metrics, encode_snapshot_request
from shared.schema import SiteMetrics, SnapshotRequest

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
