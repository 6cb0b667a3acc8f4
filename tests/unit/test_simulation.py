"""The in-process federation runs the shipped engine; clock, metrics and data checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmq.experiments.simulation import (
    FederationData,
    FederationSettings,
    LocalSettings,
    SiteData,
    UnsupportedDataset,
    _Tracker,
    bootstrap_auc_ci,
    check_binary,
    run_centralized,
    run_federation_sim,
)


def _tiny_data(seed: int = 0, n_per_site: int = 24) -> FederationData:
    g = torch.Generator().manual_seed(seed)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % 2).to(torch.float32)
        X = torch.rand(n, 1, 28, 28, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.3
        return X, y

    sites = []
    for i in range(3):
        Xt, yt = make(n_per_site)
        Xv, yv = make(8)
        sites.append(SiteData(f"hospital-{chr(97 + i)}", Xt, yt, Xv, yv))
    Xte, yte = make(16)
    return FederationData(sites, torch.cat([s.X_val for s in sites]), torch.cat([s.y_val for s in sites]), Xte, yte, "tiny")


LOCAL = LocalSettings(lr=1e-2, optimizer="adam", batch_size=16, local_epochs=1)


def test_simulation_versions_are_the_shipped_engines() -> None:
    """The simulated federation's model is what the AggregatorEngine committed, applied by the
    site's own receiver: decrypting the engine's checkpoint gives the same x_v bit for bit, and
    every contributor's weight is the engine policy's."""
    from fedmq.aggregator import checkpoint as cpmod
    from fedmq.aggregator.engine import AggregatorEngine
    from fedmq.shared.ckks import decrypt_block
    from fedmq.site_agent.model_state import FederatedModel, model_vector

    seen = {}

    def grab(driver) -> None:
        eng = driver.engine
        assert isinstance(eng, AggregatorEngine) and not eng.ctx.is_private
        cp = cpmod.load(eng.state_dir)
        bs = eng.block_size
        D = np.zeros(eng.total_blocks * bs)
        for i, ct in cp.blocks.items():
            D[i * bs:(i + 1) * bs] = decrypt_block(driver.receiver.ctx, ct)[:bs]
        fm = FederatedModel.create("small_cnn", 0)
        seen.update(version=cp.version, from_checkpoint=model_vector(fm.x0, D, eng.value_scale)[: fm.x0.size],
                    held=driver.vector(), policy=eng.policy)

    data = _tiny_data()
    fed = FederationSettings(rounds=2, topk_fraction=0.5)
    r = run_federation_sim(data, LOCAL, fed, seed=1, on_engine=grab)
    assert seen["version"] == 2 and len(r.history) == 3  # x_0 + two versions
    np.testing.assert_array_equal(seen["held"], seen["from_checkpoint"].astype(seen["held"].dtype))
    # the model scored last is the engine's version 2
    model = FederatedModel.create("small_cnn", 0)
    from fedmq.experiments.simulation import _Tracker as T
    assert T(data, model, 0.0)._eval(seen["held"])[3] == pytest.approx(r.history[-1].test_auc)
    assert [v["version"] for v in r.versions] == [1, 2]
    for v in r.versions:
        assert sorted(c["site_id"] for c in v["contributors"]) == [s.name for s in data.sites]
        for c in v["contributors"]:
            adm = seen["policy"].admit(site_id=c["site_id"], base_version=c["base_version"],
                                       current_version=c["base_version"], sample_weight=c["sample_weight"])
            assert c["weight_units"] == adm.weight_units
    assert r.bytes_up > 0 and r.bytes_down > 0 and not r.bytes_estimated
    assert r.updates == 6 and r.optimizer_steps == 6 * 2


def test_the_engine_refuses_stale_updates_in_the_simulation() -> None:
    """Staleness refusal is the engine's rule: with max_staleness 0 the straggler's update, based
    on a version two commits old, is dead-lettered as too-stale and never folded."""
    data = _tiny_data()
    fed = FederationSettings(mode="async", buffer_size=1, rounds=2, max_staleness=0, slowdowns=(1.0, 1.0, 4.0),
                             clock="steps", seconds_per_step=0.1)
    r = run_federation_sim(data, LOCAL, fed, seed=0)
    assert r.refused.get("too-stale", 0) > 0
    assert all(c["staleness"] == 0 for v in r.versions for c in v["contributors"])
    assert r.updates == sum(len(v["contributors"]) for v in r.versions) < 6


def test_async_clock_and_staleness_with_a_straggler() -> None:
    data = _tiny_data()
    fed = FederationSettings(mode="async", buffer_size=2, rounds=2, slowdowns=(1.0, 1.0, 4.0),
                             clock="steps", seconds_per_step=0.1)
    r = run_federation_sim(data, LOCAL, fed, seed=0)
    times = [p.sim_seconds for p in r.history]
    assert times == sorted(times)
    assert r.updates == 6 and len(r.history) == 1 + 3  # K=2: three versions from six updates
    # fast sites' two rounds take 0.4 s; the straggler's first alone takes 0.8 s
    assert r.history[1].sim_seconds == pytest.approx(0.2)
    assert r.sim_seconds == pytest.approx(1.6)


def test_sync_round_waits_for_the_slowest_site_and_dp_spends_at_most_the_budget() -> None:
    data = _tiny_data()
    local = LOCAL.model_copy(update={"dp": True, "target_epsilon": 1.2, "batch_size": 8})
    fed = FederationSettings(mode="sync", rounds=2, slowdowns=(1.0, 1.0, 4.0),
                             clock="steps", seconds_per_step=0.1)
    r = run_federation_sim(data, local, fed, seed=0)
    assert r.history[1].sim_seconds == pytest.approx(3 * 0.1 * 4.0)
    assert len(r.epsilon_spent) == 3 and max(r.epsilon_spent) <= 1.2 + 1e-6
    assert r.noise_multiplier and r.noise_multiplier > 0


def test_centralized_matches_the_federation_step_count() -> None:
    data = _tiny_data()
    fed = FederationSettings(rounds=2)
    c = run_centralized(data, LOCAL, fed, seed=0)
    f = run_federation_sim(data, LOCAL, fed, seed=0)
    assert c.optimizer_steps == f.optimizer_steps
    assert 0.0 <= c.test_accuracy <= 1.0 and c.bytes_up > 0


def test_ema_of_versions_is_scored_and_competes_in_the_selection() -> None:
    data = _tiny_data()
    fed = FederationSettings(rounds=3)
    off = run_federation_sim(data, LOCAL, fed, seed=0)
    on = run_federation_sim(data, LOCAL, fed.model_copy(update={"ema_beta": 0.8}), seed=0)
    assert off.selected_model == "raw" and off.ema_beta is None
    assert all(np.isnan(p.ema_val_auc) for p in off.history)
    # post-processing only: the raw trajectory is unchanged (up to fresh CKKS noise per run)
    assert [p.val_auc for p in on.history] == pytest.approx([p.val_auc for p in off.history], abs=0.02)
    assert np.isnan(on.history[0].ema_val_auc)  # x_0 is never averaged in
    assert on.history[1].ema_val_auc == on.history[1].val_auc  # ema_1 = x_1
    assert all(not np.isnan(p.ema_test_auc) for p in on.history[1:])
    best = max(max(p.val_auc, p.ema_val_auc) for p in on.history[1:])
    assert on.val_auc == best and on.selected_model in ("raw", "ema") and on.ema_beta == 0.8
    picked = next(p for p in on.history if p.version == on.best_version)
    assert on.test_auc == (picked.ema_test_auc if on.selected_model == "ema" else picked.test_auc)
    assert on.summary()["selected_model"] == on.selected_model


def test_ema_recurrence() -> None:
    from fedmq.site_agent.model_state import FederatedModel

    fm = FederatedModel.create("small_cnn", 0)
    tr = _Tracker(_tiny_data(), fm, 0.0, ema_beta=0.5)
    xs = [fm.x0 + k for k in (1.0, 3.0, 7.0)]
    for v, x in enumerate(xs, start=1):
        tr.score(x, v, 0.0, v)
    # ema_1 = x0 + 1, ema_2 = x0 + 2, ema_3 = x0 + 4.5
    np.testing.assert_allclose(tr.ema, fm.x0 + 4.5, rtol=0, atol=1e-5)


def test_evaluator_keeps_the_same_ema() -> None:
    from fedmq.experiments.evaluator import Evaluator, VersionScore

    ev = Evaluator.__new__(Evaluator)  # no broker: only the EMA bookkeeping
    ev.ema_beta, ev._ema = 0.5, None
    for x in (1.0, 3.0, 7.0):
        out = ev.update_ema(np.full(4, x, dtype=np.float32))
    assert out.dtype == np.float32 and np.allclose(out, 4.5)
    ev.ema_beta, ev._ema = None, None
    assert ev.update_ema(np.zeros(4, np.float32)) is None
    s = VersionScore(1, 0.0, 0.9, 0.8, 0.7, 0.5, 3)
    assert np.isnan(s.ema_val_auc) and np.isnan(s.ema_test_auc) and np.isnan(s.ema_test_accuracy)


def test_one_threshold_rule_balanced_accuracy_on_validation() -> None:
    from fedmq.experiments.scoring import accuracy_at, balanced_accuracy_at, select_threshold

    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.7, 0.8, 0.9, 0.95])
    t = select_threshold(labels=y, probs=p)
    assert accuracy_at(labels=y, probs=p, threshold=t) == 1.0
    # a skewed split: 9 positives, 1 negative scored above 6 of them. Plain accuracy would call
    # everything positive (0.9); balanced accuracy keeps the negative out.
    y = np.array([0] + [1] * 9)
    p = np.array([0.6] + [0.5] * 6 + [0.7] * 3)
    t = select_threshold(labels=y, probs=p)
    assert t == pytest.approx(0.7) and balanced_accuracy_at(labels=y, probs=p, threshold=t) == pytest.approx(2 / 3)
    with pytest.raises(TypeError):
        select_threshold(y, p)  # type: ignore[misc]  # positional arrays could be swapped: refused


def test_no_second_threshold_function() -> None:
    import fedmq.experiments.evaluator as ev
    import fedmq.experiments.simulation as sim

    assert not hasattr(ev, "best_threshold") and not hasattr(sim, "best_threshold")


def test_bootstrap_interval_brackets_the_point_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    lo, hi = bootstrap_auc_ci(y, [p], n_boot=200)
    from sklearn.metrics import roc_auc_score

    assert lo < roc_auc_score(y, p) < hi and hi - lo < 0.2


def test_multi_class_dataset_is_refused(tmp_path) -> None:
    path = tmp_path / "bloodmnist.npz"
    np.savez(path, train_images=np.zeros((6, 28, 28), np.uint8), train_labels=np.array([[0], [1], [2], [3], [0], [1]]))
    with pytest.raises(UnsupportedDataset, match="4 classes"):
        check_binary(path)


def test_no_rule_of_aggregation_in_experiments_or_benchmarks() -> None:
    """K, the weights, the value scale, commit and refusal rules and the version message live in
    aggregator/ only: the drivers in experiments/ and benchmarks/ call the engine. The one
    exception is the fault run's independent oracle, which recomputes each update's expected
    weight with the imported aggregator function to check the engine's exactly-once result."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    rule = re.compile(r"\b(weight_units|value_scale|staleness_weight|fold_plain|commit_plain|commit_due)\(|"
                      r"GlobalVersionChunk\(|\.admit\(|from aggregator\.policy import")
    allowed = {("experiments/faults/live.py", "weight_units(")}
    found = []
    for folder in ("experiments", "benchmarks"):
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            for m in rule.finditer(path.read_text()):
                if (rel, m.group(0)) not in allowed:
                    found.append((rel, m.group(0)))
    assert found == []


def test_local_steps_per_site_and_for_every_site() -> None:
    """A site's steps per round: LocalSettings.local_steps for every site, local_steps_by_site by
    name (the demo's rule gives each site its own); the centralized arm matches the total."""
    data = _tiny_data()
    fed = FederationSettings(mode="sync", rounds=2, clock="steps", seconds_per_step=0.1)
    every = LOCAL.model_copy(update={"local_steps": 3})
    r = run_federation_sim(data, every, fed, seed=0)
    assert r.optimizer_steps == 3 * 3 * 2
    assert run_centralized(data, every, fed, seed=0).optimizer_steps == r.optimizer_steps
    by_site = run_federation_sim(data, LOCAL, fed, seed=0, local_steps_by_site={"hospital-c": 4})
    assert by_site.optimizer_steps == (2 + 2 + 4) * 2  # 24 images at B = 16: 2 steps per epoch
    assert by_site.history[1].sim_seconds == pytest.approx(4 * 0.1)  # the round waits for the 4 steps
