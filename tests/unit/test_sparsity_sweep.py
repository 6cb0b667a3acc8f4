"""experiments/sparsity.py: the sweep's summary shape and the pick rule (no training here; the
sweep itself is a command, ``fedmq experiment sparsity``)."""

from __future__ import annotations

import json

import pytest

from fedmq.experiments.sparsity import pick_default, summarize, write_plot

PARAMS = 1000


def _row(seed: int, val: float, test: float, bytes_per_update: float) -> dict:
    history = [{"version": v, "val_auc": val - 0.1 / v, "test_auc": test - 0.1 / v} for v in (1, 2, 3)]
    return {"seed": seed, "val_auc": val, "test_auc": test, "bytes_up": 3 * bytes_per_update, "updates": 3,
            "epsilon_max": 1.2, "history": history}


def _levels(val_by_level: dict[float, float]) -> dict[float, list[dict]]:
    size = {1.0: 6000.0, 0.5: 3100.0, 0.25: 2100.0, 0.1: 1100.0}
    return {lv: [_row(s, v + 0.001 * s, v - 0.01, size[lv]) for s in (0, 1)] for lv, v in val_by_level.items()}


def test_summary_has_levels_ratios_curves_and_the_pick(tmp_path):
    out = summarize(_levels({1.0: 0.95, 0.5: 0.945, 0.25: 0.942, 0.1: 0.90}), PARAMS)
    assert out["dense_fp32_bytes"] == 4 * PARAMS
    assert [r["topk_fraction"] for r in out["levels"]] == [1.0, 0.5, 0.25, 0.1]
    dense, *_ = out["levels"]
    assert dense["ratio_vs_dense_fp32"] == pytest.approx(6000 / 4000)
    assert dense["val_auc_per_seed"] == [0.95, 0.951] and dense["test_auc_cost_points"] == 0
    assert [p["version"] for p in dense["curve"]] == [1, 2, 3] and all(p["n"] == 2 for p in dense["curve"])
    # 0.1 loses 5 points: the sparsest level within 1 point is 0.25
    assert out["picked_topk_fraction"] == 0.25
    assert out["picked_ratio_vs_dense_fp32"] == pytest.approx(2100 / 4000)
    assert out["goal"]["met"] is True
    json.dumps(out)  # sparsity.json is written from it as is
    assert write_plot(out, tmp_path).is_file()


def test_pick_is_dense_when_every_sparser_level_loses_more_than_the_tolerance():
    out = summarize(_levels({1.0: 0.95, 0.5: 0.93, 0.25: 0.92, 0.1: 0.90}), PARAMS)
    assert out["picked_topk_fraction"] == 1.0
    assert out["goal"]["met"] is False  # dense CKKS is 1.5x float32 here


def test_pick_reads_validation_never_test():
    levels = [
        {"topk_fraction": 1.0, "val_auc_mean": 0.95, "test_auc_mean": 0.90, "bytes_per_update": 10},
        {"topk_fraction": 0.1, "val_auc_mean": 0.90, "test_auc_mean": 0.99, "bytes_per_update": 1},
    ]
    assert pick_default(levels) == 1.0
    assert pick_default(levels, key="test_auc_mean") == 0.1


def test_seed_interval_is_a_t_interval_around_the_mean():
    from fedmq.experiments.reproduce import seed_t_interval

    lo, hi = seed_t_interval([0.90, 0.91, 0.92, 0.93, 0.94])
    assert (lo + hi) / 2 == pytest.approx(0.92)
    assert hi - lo == pytest.approx(2 * 2.7764 * 0.0158114 / 5 ** 0.5, rel=1e-3)  # t(0.975, 4) x sd / sqrt(5)
    assert seed_t_interval([0.9]) is None
