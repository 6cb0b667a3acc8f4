"""Privacy ledger: budget never exceeded, survives restarts, refuses files it cannot trust."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from fedmq.site_agent.training import (
    DPConfig,
    LedgerConfigMismatch,
    LedgerError,
    LedgerParams,
    PrivacyBudgetExhausted,
    PrivacyLedger,
    noise_multiplier_for,
)


@functools.lru_cache(maxsize=None)
def _params(target: float = 4.0, q: float = 0.05, steps: int = 20, rounds: int = 4, delta: float = 1e-4) -> LedgerParams:
    sigma = noise_multiplier_for(DPConfig(target_epsilon=target, planned_rounds=rounds), delta, q, steps)
    return LedgerParams(
        noise_multiplier=sigma, sample_rate=q, delta=delta, target_epsilon=target, steps_per_round=steps, planned_rounds=rounds
    )


@pytest.fixture(scope="module")
def params() -> LedgerParams:
    return _params(4.0, 0.05, 20, 4)


def _round(ledger: PrivacyLedger) -> float:
    p = ledger.params
    return ledger.record_round(p.noise_multiplier, p.sample_rate, p.steps_per_round)


@pytest.mark.parametrize(
    ("target", "q", "steps", "rounds"),
    [(1.0, 0.02, 50, 3), (4.0, 0.05, 20, 4), (8.0, 0.02, 10, 12)],
)
def test_planned_rounds_fit_and_one_more_is_refused(target: float, q: float, steps: int, rounds: int) -> None:
    ledger = PrivacyLedger(_params(target, q, steps, rounds))
    spent = [0.0]
    for _ in range(rounds):
        assert ledger.can_contribute()
        spent.append(_round(ledger))
    assert all(a < b for a, b in zip(spent, spent[1:]))
    assert ledger.epsilon_spent() <= target
    assert ledger.rounds_done == rounds
    assert not ledger.can_contribute()
    with pytest.raises(PrivacyBudgetExhausted) as info:
        _round(ledger)
    assert info.value.epsilon_next > target and ledger.rounds_done == rounds
    with pytest.raises(PrivacyBudgetExhausted):
        ledger.ensure_can_contribute()


def test_reload_then_continue_equals_uninterrupted(tmp_path: Path, params: LedgerParams) -> None:
    path = tmp_path / "ledger.json"
    uninterrupted = PrivacyLedger(params)
    first = PrivacyLedger.open(path, params)
    assert path.exists()
    for _ in range(2):
        _round(uninterrupted)
        _round(first)
    resumed = PrivacyLedger.open(path, params)
    assert resumed.rounds_done == 2 and resumed.epsilon_spent() == first.epsilon_spent()
    _round(uninterrupted)
    _round(resumed)
    assert resumed.epsilon_spent() == pytest.approx(uninterrupted.epsilon_spent(), rel=1e-12)
    assert PrivacyLedger.load(path).history == uninterrupted.history
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temp files left behind


def test_epsilon_at_other_delta(params: LedgerParams) -> None:
    ledger = PrivacyLedger(params)
    assert ledger.epsilon_spent() == 0.0
    _round(ledger)
    assert ledger.epsilon_spent(1e-8) > ledger.epsilon_spent()


def test_corrupt_ledger_refused(tmp_path: Path, params: LedgerParams) -> None:
    path = tmp_path / "ledger.json"
    path.write_text('{"schema_version": 1, "params": ')
    with pytest.raises(LedgerError, match="corrupt"):
        PrivacyLedger.open(path, params)
    path.write_text("[]")
    with pytest.raises(LedgerError, match="not a JSON object"):
        PrivacyLedger.load(path)


def test_wrong_version_or_tampered_history_refused(tmp_path: Path, params: LedgerParams) -> None:
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, params)
    _round(ledger)
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(LedgerError, match="schema version 99"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({**good, "history": [[0.1, params.sample_rate, 5]]}))
    with pytest.raises(LedgerError, match="contradicts"):
        PrivacyLedger.load(path)
    path.write_text(json.dumps({**good, "rounds_done": -1}))
    with pytest.raises(LedgerError, match="malformed"):
        PrivacyLedger.load(path)


def test_other_dp_configuration_refused(tmp_path: Path, params: LedgerParams) -> None:
    path = tmp_path / "ledger.json"
    PrivacyLedger.open(path, params)
    for change in ({"sample_rate": 0.06}, {"delta": 1e-6}, {"noise_multiplier": params.noise_multiplier * 1.5}):
        with pytest.raises(LedgerConfigMismatch):
            PrivacyLedger.open(path, params.model_copy(update=change))
    ledger = PrivacyLedger.load(path)
    with pytest.raises(LedgerConfigMismatch):
        ledger.record_round(params.noise_multiplier, 0.5, params.steps_per_round)
