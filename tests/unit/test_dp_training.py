"""DP-SGD rounds: epsilon grows per round, never beyond the target, and weights come back clean."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from fedmq.site_agent.models import build_model
from fedmq.site_agent.training import (
    DPConfig,
    LocalTrainer,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    TrainingConfig,
    evaluate,
    strip_opacus_prefix,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Separable synthetic images: bright centre square means class 1."""
    g = torch.Generator().manual_seed(0)
    X = torch.rand(240, 1, 28, 28, generator=g) * 0.5
    y = (torch.arange(240) % 2).float()
    X[y == 1, :, 9:19, 9:19] += 0.5
    return X, y


def _config(**dp: object) -> TrainingConfig:
    settings = {"enabled": True, "target_epsilon": 1.0, "planned_rounds": 3, "max_grad_norm": 1.0, **dp}
    return TrainingConfig(
        lr=0.003, optimizer="adam", batch_size=12, local_steps=4, seed=3, dp=DPConfig(**settings)
    )


def test_dp_rounds_spend_budget_then_refuse(tmp_path: Path, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    X, y = data
    trainer = LocalTrainer(_config(), tmp_path / "ledger.json")
    plain_keys = set(build_model("small_cnn", 3).state_dict())
    state = None
    eps = [0.0]
    for r in range(3):
        result = trainer.train_round(state, X, y, round_index=r)
        state = result.state_dict
        assert set(state) == plain_keys  # no "_module." prefixes from Opacus
        assert result.steps == 4 and result.n_samples == 240
        assert result.sample_rate == pytest.approx(0.05) and result.delta == pytest.approx(1 / 2400)
        assert result.noise_multiplier > 0.5
        assert {"train_s", "dp_clip_noise_s", "forward_backward_s", "data_prep_s"} <= set(result.timings)
        eps.append(result.epsilon)
        assert PrivacyLedger.load(tmp_path / "ledger.json").rounds_done == r + 1  # persisted before return
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert eps[-1] <= 1.0
    with pytest.raises(PrivacyBudgetExhausted):
        trainer.train_round(state, X, y, round_index=3)
    # A restarted site reads the ledger and is refused too.
    with pytest.raises(PrivacyBudgetExhausted):
        LocalTrainer(_config(), tmp_path / "ledger.json").train_round(state, X, y, round_index=3)
    model = build_model("small_cnn", 0)
    model.load_state_dict(state)
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in model.parameters())
    metrics = evaluate(model, X, y)
    assert metrics["n"] == 240 and 0.0 <= metrics["auc"] <= 1.0 and metrics["threshold"] == 0.5


def test_dp_round_is_deterministic_and_moves_weights(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    X, y = data
    init = build_model("small_cnn", 3).state_dict()
    a = LocalTrainer(_config()).train_round(init, X, y, round_index=0)
    b = LocalTrainer(_config()).train_round(init, X, y, round_index=0)
    c = LocalTrainer(_config()).train_round(init, X, y, round_index=1)
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert any(not torch.equal(a.state_dict[k], init[k]) for k in init)
    assert any(not torch.equal(a.state_dict[k], c.state_dict[k]) for k in init)


def test_dp_off_trains_without_ledger(tmp_path: Path, data: tuple[torch.Tensor, torch.Tensor]) -> None:
    X, y = data
    config = TrainingConfig(lr=0.01, optimizer="adam", batch_size=32, local_epochs=3, pos_weight=1.0, dp=DPConfig(enabled=False))
    trainer = LocalTrainer(config, tmp_path / "ledger.json", num_threads=1)
    torch.set_num_threads(2)  # not the trainer's 1, so restoring it is observable
    try:
        result = trainer.train_round(None, X, y)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert result.epsilon is None and result.steps == 3 * math.ceil(240 / 32)
    assert not (tmp_path / "ledger.json").exists()
    model = build_model("small_cnn", 0)
    model.load_state_dict(result.state_dict)
    assert evaluate(model, X, y)["auc"] > 0.9


def test_initial_state_with_opacus_prefix_accepted() -> None:
    state = build_model("small_cnn", 1).state_dict()
    prefixed = {f"_module.{k}": v for k, v in state.items()}
    assert strip_opacus_prefix(prefixed).keys() == state.keys()


def test_evaluate_single_class_gives_nan_auc(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    X, _ = data
    metrics = evaluate(build_model("small_cnn", 0), X[:10], torch.ones(10))
    assert math.isnan(metrics["auc"]) and metrics["n"] == 10


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": -0.1}, {"batch_size": 0}, {"optimizer": "rmsprop"}, {"momentum": 1.0}, {"local_steps": 0}, {"unknown": 1}],
)
def test_training_config_validation(kwargs: dict) -> None:
    with pytest.raises(ValidationError):
        TrainingConfig(**kwargs)


def test_dp_config_validation() -> None:
    for bad in ({"target_epsilon": 0}, {"max_grad_norm": -1}, {"planned_rounds": 0}, {"delta": 1.5}):
        with pytest.raises(ValidationError):
            DPConfig(**bad)
    assert DPConfig().resolve_delta(1000) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="exceeds 1/n"):
        DPConfig(delta=0.01).resolve_delta(1000)
