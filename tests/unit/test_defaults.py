"""The default rules (experiments/defaults.py) and that the demo reads them rather than numbers."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedmq.experiments import defaults
from fedmq.experiments.defaults import (
    async_buffer_size,
    clip_norm,
    dp_learning_rate,
    dp_noise_multiplier,
    ema_beta,
    expected_versions,
    federation_learning_rate,
    planned_rounds,
)


def test_the_lr_rule_holds_the_per_step_noise_fixed() -> None:
    for sigma, batch, c in ((9.3, 128, 1.0), (3.8, 128, 1.0), (5.0, 64, 2.0)):
        lr = dp_learning_rate(sigma, batch_size=batch, max_grad_norm=c)
        assert lr * sigma * c / batch == pytest.approx(defaults.DP_STEP_NOISE)
    # the anchor the rule was taken from: lr 0.02 at sigma 9.3, B = 128 (docs/reproduction.md, c1)
    assert dp_learning_rate(9.3, batch_size=128) == pytest.approx(0.0206, abs=1e-4)
    # more noise, smaller steps; a larger batch divides the noise, larger steps
    assert dp_learning_rate(8.0, batch_size=128) < dp_learning_rate(4.0, batch_size=128)
    assert dp_learning_rate(4.0, batch_size=256) > dp_learning_rate(4.0, batch_size=128)
    with pytest.raises(ValueError):
        dp_learning_rate(0.0, batch_size=128)


def test_momentum_gain_of_a_round_that_starts_from_rest() -> None:
    from fedmq.experiments.defaults import momentum_gain

    assert momentum_gain(1) == pytest.approx(1.0)
    assert momentum_gain(2) == pytest.approx((1 + 1.9) / 2)
    assert momentum_gain(4) == pytest.approx(2.26225)
    assert momentum_gain(16) == pytest.approx(5.4173, abs=1e-4)
    assert momentum_gain(10_000) == pytest.approx(10.0, rel=1e-2)  # 1 / (1 - m) only in the limit
    assert momentum_gain(8, momentum=0.0) == 1.0
    gains = [momentum_gain(s) for s in range(1, 40)]
    assert gains == sorted(gains)
    with pytest.raises(ValueError):
        momentum_gain(0)


def test_short_rounds_hold_the_momentum_effective_step_of_the_anchor() -> None:
    """lr x g(S) x sigma x C / B = 1.5e-3 x g(16): rounds of S steps get the step the anchor's
    16-step rounds had; one-epoch rounds (round_steps None) keep the anchor as it is."""
    from fedmq.experiments.defaults import ANCHOR_ROUND_STEPS, momentum_gain

    for sigma, s in ((6.68, 4), (14.9, 4), (9.3, 8), (9.3, 16)):
        lr = dp_learning_rate(sigma, batch_size=128, round_steps=s)
        assert lr * momentum_gain(s) * sigma / 128 == pytest.approx(defaults.DP_STEP_NOISE * momentum_gain(ANCHOR_ROUND_STEPS))
    assert dp_learning_rate(9.3, batch_size=128, round_steps=ANCHOR_ROUND_STEPS) == pytest.approx(
        dp_learning_rate(9.3, batch_size=128))
    assert dp_learning_rate(6.68, batch_size=128, round_steps=4) == pytest.approx(0.0688, abs=1e-4)  # seed 4's
    assert dp_learning_rate(9.3, batch_size=128, round_steps=4, momentum=0.0) == pytest.approx(
        dp_learning_rate(9.3, batch_size=128))
    lrs = federation_learning_rate({"a": 2.85, "b": 14.9}, batch_size=128, round_steps=4)
    assert lrs["a"] == lrs["b"] == pytest.approx(dp_learning_rate(14.9, batch_size=128, round_steps=4))


def test_one_federation_lr_set_by_the_noisiest_site() -> None:
    lrs = federation_learning_rate({"a": 3.8, "b": 9.3, "c": 4.0}, batch_size=128)
    assert set(lrs) == {"a", "b", "c"} and len(set(lrs.values())) == 1
    assert lrs["a"] == pytest.approx(dp_learning_rate(9.3, batch_size=128))
    with pytest.raises(ValueError):
        federation_learning_rate({}, batch_size=128)


def test_the_noise_multiplier_is_the_sites_own() -> None:
    """The rule sees the sigma the site's ledger binds itself to, computed by the site's code."""
    from fedmq.site_agent.training.config import DPConfig, TrainingConfig
    from fedmq.site_agent.training.trainer import LocalTrainer

    n = 1958
    cfg = TrainingConfig(batch_size=128, local_epochs=1, dp=DPConfig(target_epsilon=1.2, planned_rounds=20))
    site = LocalTrainer(cfg, None).open_ledger(n).params.noise_multiplier
    assert dp_noise_multiplier(n, batch_size=128, rounds=20, epsilon=1.2) == pytest.approx(site)
    # the budget is spread over more rounds: more noise per round; a smaller site: more noise
    assert dp_noise_multiplier(n, batch_size=128, rounds=40, epsilon=1.2) > site
    assert dp_noise_multiplier(300, batch_size=128, rounds=20, epsilon=1.2) > site


def test_ema_beta_from_the_number_of_versions() -> None:
    assert ema_beta(20) == pytest.approx(1 - 2 / 6)  # a 5-version window: 0.667
    assert ema_beta(40) == pytest.approx(1 - 2 / 11)
    assert ema_beta(1) == ema_beta(4) == 0.0  # a window of one version: the version itself
    betas = [ema_beta(v) for v in range(1, 200)]
    assert all(0.0 <= b < 1.0 for b in betas) and betas == sorted(betas)
    with pytest.raises(ValueError):
        ema_beta(0)


def test_expected_versions_and_the_other_rules() -> None:
    assert expected_versions(20, 3, 3) == 20  # async under DP (K = n) and sync: one per round
    assert expected_versions(20, 3, 2) == 30
    assert planned_rounds() == defaults.ROUNDS and clip_norm() == defaults.CLIP_NORM
    assert async_buffer_size(3, dp=True) == 3 and async_buffer_size(3, dp=False) == 2


def _demo_args(**kw) -> argparse.Namespace:
    base = dict(workdir="w", seed=0, buffer_size=None, no_dp=False, epsilon=1.2, rounds=None, target_auc=None,
                time_limit=600.0, amqp_url=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_the_demo_reads_the_rules(tmp_path: Path) -> None:
    from fedmq.experiments.demo import demo_spec

    spec = demo_spec(_demo_args(), tmp_path / "x.npz")
    assert spec.training.lr is None  # the lr rule, per run, from the sites' noise multipliers
    assert spec.training.model_preset == defaults.model_preset() == "scatternet"
    assert spec.training.max_grad_norm == clip_norm()
    # rounds of at most S steps: T = 320 steps of a large site cut into R = T / S rounds
    assert spec.planned_rounds == planned_rounds(short=True) == defaults.SHORT_RUN_STEPS // defaults.LOCAL_STEPS == 80
    assert spec.training.most_local_steps == defaults.LOCAL_STEPS and spec.training.local_steps is None
    assert spec.buffer_size == async_buffer_size(3, dp=True)
    assert spec.resolved_ema_beta() == pytest.approx(ema_beta(planned_rounds(short=True)))
    assert demo_spec(_demo_args(no_dp=True), tmp_path / "x.npz").training.lr is not None


def test_the_federation_applies_the_lr_rule_to_its_sites(tmp_path: Path) -> None:
    from fedmq.experiments.federation import Federation, FederationSpec, SiteTraining

    spec = FederationSpec(workdir=tmp_path, data_npz=tmp_path / "x.npz", n_sites=2, planned_rounds=20,
                          training=SiteTraining(lr=None, batch_size=128))
    fed = Federation(spec)
    fed.summary = {"sites": {"hospital_1": {"train": {"0": 100, "1": 137}}, "hospital_2": {"train": {"0": 900, "1": 1058}}}}
    lrs = fed.site_learning_rates()
    sigma_small = dp_noise_multiplier(237, batch_size=128, rounds=20, epsilon=1.2)
    assert fed.noise_multipliers["hospital_1"] == pytest.approx(sigma_small)
    assert lrs == {s: pytest.approx(dp_learning_rate(sigma_small, batch_size=128)) for s in ("hospital_1", "hospital_2")}
    fixed = Federation(spec.model_copy(update={"training": SiteTraining(lr=0.03)}))
    fixed.summary = fed.summary
    assert fixed.site_learning_rates() == {"hospital_1": 0.03, "hospital_2": 0.03}
    no_dp = Federation(spec.model_copy(update={"dp_enabled": False}))
    no_dp.summary = fed.summary
    with pytest.raises(ValueError):
        no_dp.site_learning_rates()


def test_the_federation_lr_from_site_sizes_is_the_noisiest_sites() -> None:
    from fedmq.experiments.defaults import dp_federation_lr_for_sizes

    lr = dp_federation_lr_for_sizes([237, 1958], batch_size=128, rounds=20, epsilon=1.2)
    assert lr == pytest.approx(dp_learning_rate(dp_noise_multiplier(237, batch_size=128, rounds=20, epsilon=1.2),
                                                batch_size=128))


def test_local_steps_are_one_epoch_capped_at_s() -> None:
    from fedmq.experiments.defaults import LOCAL_STEPS, local_steps

    assert local_steps(2748, batch_size=128) == LOCAL_STEPS == 4  # a large site: S steps, not 22
    assert local_steps(237, batch_size=128) == 2  # a small site: one epoch, never several passes
    assert local_steps(433, batch_size=128) == 4
    assert local_steps(50, batch_size=128) == 1
    assert local_steps(2748, batch_size=128, most=30) == 22
    with pytest.raises(ValueError):
        local_steps(0, batch_size=128)


def test_the_federation_gives_each_site_its_local_steps(tmp_path: Path) -> None:
    """Each site's steps per round, its noise multiplier and its config agree: the accountant
    charges the steps the site will take."""
    from fedmq.experiments.federation import Federation, FederationSpec, SiteTraining

    spec = FederationSpec(workdir=tmp_path, data_npz=tmp_path / "x.npz", n_sites=2, planned_rounds=40,
                          training=SiteTraining(lr=None, batch_size=128, most_local_steps=8))
    fed = Federation(spec)
    fed.summary = {"sites": {"hospital_1": {"train": {"0": 100, "1": 137}}, "hospital_2": {"train": {"0": 900, "1": 1058}}}}
    assert fed.site_local_steps() == {"hospital_1": 2, "hospital_2": 8}
    fed.site_learning_rates()
    assert fed.noise_multipliers["hospital_1"] == pytest.approx(
        dp_noise_multiplier(237, batch_size=128, rounds=40, epsilon=1.2, local_steps=2))
    assert fed.noise_multipliers["hospital_2"] == pytest.approx(
        dp_noise_multiplier(1958, batch_size=128, rounds=40, epsilon=1.2, local_steps=8))
    from fedmq.site_agent.training.config import DPConfig, TrainingConfig
    from fedmq.site_agent.training.trainer import LocalTrainer

    site = TrainingConfig(batch_size=128, local_steps=8, dp=DPConfig(target_epsilon=1.2, planned_rounds=40))
    assert LocalTrainer(site, None).open_ledger(1958).params.noise_multiplier == pytest.approx(
        fed.noise_multipliers["hospital_2"])
    # rounds of at most S = 8 steps: the lr rule with its momentum correction for S
    sigma_max = max(fed.noise_multipliers.values())
    assert fed.site_learning_rates()["hospital_2"] == pytest.approx(
        dp_learning_rate(sigma_max, batch_size=128, round_steps=8))
    uniform = Federation(spec.model_copy(update={"training": SiteTraining(lr=None, batch_size=128, local_steps=5)}))
    uniform.summary = fed.summary
    assert uniform.site_local_steps() == {"hospital_1": 5, "hospital_2": 5}


def test_reproduction_defaults_are_the_rules() -> None:
    """The reproduction carries no tuned number for the DP learning rate or the EMA: each seed's
    DP arms take the rule for that seed's sites, and the EMA the rule for the arm's versions."""
    from fedmq.experiments.defaults import dp_federation_lr_for_sizes
    from fedmq.experiments.reproduce import ReproduceConfig

    cfg = ReproduceConfig()
    assert cfg.preset == defaults.model_preset()
    sizes = [237, 1_640, 2_831]
    fl_dp, central = cfg.dp_settings(sizes), cfg.dp_settings([sum(sizes)])
    assert fl_dp.lr == pytest.approx(dp_federation_lr_for_sizes(sizes, batch_size=128, rounds=20, epsilon=1.2))
    assert central.lr == pytest.approx(dp_federation_lr_for_sizes([sum(sizes)], batch_size=128, rounds=20, epsilon=1.2))
    assert central.lr > fl_dp.lr  # one site holding all images needs less noise: a larger step
    assert fl_dp.dp and fl_dp.optimizer == "sgd" and fl_dp.batch_size == 128  # only the lr is the rule's
    assert cfg.federation(rounds=20).ema_beta == pytest.approx(ema_beta(20))
    assert ReproduceConfig.quick_config().federation(rounds=3).ema_beta is None  # 3 versions: nothing to average
    fixed = ReproduceConfig(dp_lr=0.05, ema_beta=0.7)
    assert fixed.dp_settings(sizes).lr == 0.05 and fixed.federation(rounds=20).ema_beta == 0.7
