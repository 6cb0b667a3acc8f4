"""``fedmq experiment reproduce --quick`` end to end: JSON keys, sane values, report and plots.

Checks the shape and sanity of the output, not the study's targets (one seed, few rounds).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from shared.cli import main

REPO = Path(__file__).resolve().parents[2]


def _data_root() -> Path | None:
    candidates = [os.environ.get("FEDMQ_DATA_ROOT"), str(REPO.parent / "shared" / "data")]
    for c in candidates:
        if c and (Path(c) / "pneumoniamnist.npz").is_file():
            return Path(c)
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reproduce_quick_writes_sane_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _data_root()
    if root is None:
        pytest.skip("pneumoniamnist.npz not found (set FEDMQ_DATA_ROOT)")
    out = tmp_path / "reproduce"
    assert main(["experiment", "reproduce", "--quick", "--data-root", str(root), "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["seeds"] == [0]
    assert set(results["arms"]) == {"centralized", "centralized_dp", "fl", "fl_dp"}
    for name, arm in results["arms"].items():
        for key in ("auc_mean", "auc_ci", "acc_mean", "wall_seconds", "bytes_sent"):
            assert key in arm, (name, key)
        lo, hi = arm["auc_ci"]
        assert 0.5 < arm["auc_mean"] <= 1.0, (name, arm["auc_mean"])
        assert 0.0 <= lo <= hi <= 1.0
        assert 0.0 < arm["acc_mean"] <= 1.0
        assert arm["wall_seconds"] > 0 and arm["bytes_sent"] > 0
    for name in ("centralized_dp", "fl_dp"):
        assert results["arms"][name]["epsilon_spent_max"] <= 1.2 + 1e-6
    # FL traffic: encrypted updates up plus broadcasts down, measured from real encodings
    assert results["arms"]["fl"]["bytes_up"] > 0 and results["arms"]["fl"]["bytes_down"] > 0

    avs = results["async_vs_sync"]
    for key in ("async_seconds_to_target", "sync_seconds_to_target", "target_auc"):
        assert key in avs
    for key in ("async_seconds_to_target", "sync_seconds_to_target"):
        assert avs[key] is None or (math.isfinite(avs[key]) and avs[key] > 0)
    assert 0.5 < avs["target_auc"] < 1.0

    report = (out / "report.md").read_text()
    assert "0.923" in report and "0.944" in report and "Targets" in report
    for png in ("auc_by_arm.png", "learning_curves.png", "async_vs_sync.png"):
        assert (out / png).stat().st_size > 1000


def test_multi_class_dataset_is_refused_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((4, 28, 28), np.uint8),
             train_labels=np.array([[0], [1], [2], [3]]), test_images=np.zeros((4, 28, 28), np.uint8),
             test_labels=np.array([[0], [1], [2], [3]]))
    rc = main(["experiment", "reproduce", "--quick", "--dataset", "bloodmnist", "--data-root", str(tmp_path),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "binary" in capsys.readouterr().err
