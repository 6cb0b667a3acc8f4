"""The in-process federation: encrypted and plaintext folding agree, metrics and data checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.simulation import (
    FederationData,
    FederationSettings,
    LocalSettings,
    SiteData,
    UnsupportedDataset,
    accuracy_at,
    best_threshold,
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


def test_encrypted_and_plaintext_folds_give_the_same_model() -> None:
    data = _tiny_data()
    fed = FederationSettings(rounds=2, topk_fraction=0.5, encrypted=False)
    plain = run_federation_sim(data, LOCAL, fed, seed=1)
    enc = run_federation_sim(data, LOCAL, fed.model_copy(update={"encrypted": True}), seed=1)
    assert len(plain.history) == len(enc.history) == 3  # x_0 + two versions
    for a, b in zip(plain.history, enc.history, strict=True):
        assert a.val_auc == pytest.approx(b.val_auc, abs=0.05)
    # CKKS noise (~1e-7 per value) shifts round 2's starting point a little
    np.testing.assert_allclose(plain.test_probs, enc.test_probs, atol=2e-3)
    assert enc.bytes_up > 0 and enc.bytes_down > 0 and not enc.bytes_estimated
    # the plaintext estimate is within a few percent of the real encodings
    assert plain.bytes_up == pytest.approx(enc.bytes_up, rel=0.05)
    assert enc.updates == 6 and enc.optimizer_steps == 6 * 2


def test_async_clock_and_staleness_with_a_straggler() -> None:
    data = _tiny_data()
    fed = FederationSettings(mode="async", buffer_size=2, rounds=2, encrypted=False, slowdowns=(1.0, 1.0, 4.0),
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
    fed = FederationSettings(mode="sync", rounds=2, encrypted=False, slowdowns=(1.0, 1.0, 4.0),
                             clock="steps", seconds_per_step=0.1)
    r = run_federation_sim(data, local, fed, seed=0)
    assert r.history[1].sim_seconds == pytest.approx(3 * 0.1 * 4.0)
    assert len(r.epsilon_spent) == 3 and max(r.epsilon_spent) <= 1.2 + 1e-6
    assert r.noise_multiplier and r.noise_multiplier > 0


def test_centralized_matches_the_federation_step_count() -> None:
    data = _tiny_data()
    fed = FederationSettings(rounds=2, encrypted=False)
    c = run_centralized(data, LOCAL, fed, seed=0)
    f = run_federation_sim(data, LOCAL, fed, seed=0)
    assert c.optimizer_steps == f.optimizer_steps
    assert 0.0 <= c.test_accuracy <= 1.0 and c.bytes_up > 0


def test_threshold_is_chosen_for_accuracy() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.7, 0.8, 0.9, 0.95])
    t = best_threshold(y, p)
    assert accuracy_at(y, p, t) == 1.0


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
