"""Issue 18: an error names what it compares. A site running another model preset learns which
preset the federation trains and which it runs itself, and stops wasting rounds."""

from __future__ import annotations

import numpy as np

from fedmq.aggregator.engine import AggregatorEngine, Intent
from integration.aggregator_helpers import LAYOUT_FP, make_federation, random_delta
from fedmq.shared.codec import decode
from fedmq.shared.schema import Rejection
from fedmq.site_agent.model_state import FederatedModel, describe_layout_mismatch


def test_layout_mismatch_names_both_presets():
    small = FederatedModel.create("small_cnn", 0).layout.fingerprint
    resnet = FederatedModel.create("resnet18", 0).layout.fingerprint
    text = describe_layout_mismatch(resnet, "small_cnn", 0, small, "the federation's global model")
    assert "preset 'resnet18' with init_seed 0" in text and "preset 'small_cnn'" in text
    assert resnet in text and small in text
    unknown = describe_layout_mismatch("f" * 32, "small_cnn", 0, small, "the federation's global model")
    assert "another preset or init_seed" in unknown


def test_aggregator_names_fingerprints_and_tells_the_site(tmp_path):
    fed = make_federation(tmp_path, sites=("alpha", "bravo"))
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=2, layout_fingerprint=LAYOUT_FP))
    rng = np.random.default_rng(0)
    bodies, _ = fed.update("bravo", 1, 0, random_delta(rng, fed.n_params), layout_fp="resnet-layout-000000000")
    decision, out = eng.handle_chunk(bodies[0])
    assert decision.action == "reject" and decision.reason == "layout-fingerprint"
    assert "resnet-layout-000000000" in decision.detail and LAYOUT_FP in decision.detail
    assert "layout_fingerprint setting" in decision.detail and "model_preset or init_seed" in decision.detail
    notices = [o for o in out if o.kind == "notice"]
    assert len(notices) == 1 and notices[0].intent is Intent.TO_SITE and notices[0].site_id == "bravo"
    msg = decode(notices[0].body)
    assert isinstance(msg, Rejection) and msg.reason == "layout-fingerprint" and msg.update_id == "bravo:1"
    eng.close()


def test_a_site_alert_reaches_status_and_metrics(tmp_path):
    import time

    from fedmq.aggregator.status_cli import render
    from fedmq.shared.codec import encode
    from fedmq.shared.schema import SiteMetrics

    fed = make_federation(tmp_path, sites=("alpha",))
    eng = AggregatorEngine(fed.settings(tmp_path / "s", buffer_size=1))
    alert = "paused: diverged: validation loss 3336 at version 1 is more than 10x the best seen (0.6)"
    msg = SiteMetrics(site_id="alpha", version=1, auc=0.5, n_val=10, epsilon_spent=0.2, epsilon_target=1.2,
                      updates_sent=1, timestamp=time.time(), alert=alert)
    assert eng.handle_site_metrics(encode(msg)).action == "accept"
    assert f"ALERT alpha: {alert}" in render(eng.status())
    assert eng.metrics.site_paused.labels(site="alpha")._value.get() == 1
    ok = msg.model_copy(update={"alert": None, "version": 2})
    eng.handle_site_metrics(encode(ok))
    assert "ALERT" not in render(eng.status()) and eng.metrics.site_paused.labels(site="alpha")._value.get() == 0
    eng.close()
