"""experiments/selection_gap.py: the diagnosis reads a reproduction's results.json as written."""

from __future__ import annotations

import math

import pytest

from fedmq.experiments.selection_gap import gaps, write_plot


def _run(test_by_v: list[float], val_by_v: list[float], best_version: int) -> dict:
    history = [{"version": 0, "val_auc": 0.5, "test_auc": 0.5, "ema_val_auc": math.nan, "ema_test_auc": math.nan}]
    history += [{"version": v, "val_auc": va, "test_auc": te, "ema_val_auc": va - 0.001, "ema_test_auc": te + 0.01}
                for v, (te, va) in enumerate(zip(test_by_v, val_by_v), start=1)]
    return {"history": history, "best_version": best_version, "selected_model": "raw",
            "test_auc": test_by_v[best_version - 1], "val_auc": val_by_v[best_version - 1]}


def test_gap_is_best_test_minus_selected(tmp_path):
    results = {"arms": {"centralized": {"runs": [
        _run([0.90, 0.95, 0.93], [0.990, 0.991, 0.995], best_version=3),
        _run([0.92, 0.94, 0.91], [0.990, 0.995, 0.994], best_version=2),
    ]}}}
    g = gaps(results)["arms"]["centralized"]
    # seed 0: selected 0.93, best candidate on test is v2's EMA 0.96; seed 1: 0.94 vs v2's EMA 0.95
    assert [r["best_test_auc"] for r in g["per_seed"]] == pytest.approx([0.96, 0.95])
    assert g["gap_points"] == pytest.approx(100 * ((0.96 - 0.93) + (0.95 - 0.94)) / 2)
    # within 0.002 of the best validation AUC: seed 0 v3 raw + ema; seed 1 v2, v3 raw + ema
    assert [r["near_best_val"] for r in g["per_seed"]] == [2, 4]
    assert write_plot(results, tmp_path).is_file()
