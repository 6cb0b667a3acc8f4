"""``fedmq experiment reproduce --quick`` end to end: JSON keys, sane values, report and plots;
the dataset registry's errors.

Checks the shape and sanity of the output, not the study's targets (one seed, few rounds), on
a small stratified subset of PneumoniaMNIST written in the official npz format (``--npz``): the
shape of the output does not need the full dataset.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from fedmq.shared.cli import main

REPO = Path(__file__).resolve().parents[2]


def _data_root() -> Path | None:
    candidates = [os.environ.get("FEDMQ_DATA_ROOT"), str(REPO.parent / "shared" / "data")]
    for c in candidates:
        if c and (Path(c) / "pneumoniamnist.npz").is_file():
            return Path(c)
    return None


def _subset_npz(root: Path, out: Path, per_split: dict[str, int]) -> Path:
    import numpy as np

    src = np.load(root / "pneumoniamnist.npz")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in per_split.items():
        labels = src[f"{split}_labels"].reshape(-1)
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: n // 2] for c in (0, 1)])
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = src[f"{split}_images"][idx], src[f"{split}_labels"][idx]
    np.savez(out, **arrays)
    return out


@pytest.mark.timeout(600)
def test_reproduce_quick_writes_sane_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _data_root()
    if root is None:
        pytest.skip("pneumoniamnist.npz not found (set FEDMQ_DATA_ROOT)")
    npz = _subset_npz(root, tmp_path / "pneumonia-subset.npz", {"train": 150, "val": 40, "test": 60})
    out = tmp_path / "reproduce"
    assert main(["experiment", "reproduce", "--quick", "--npz", str(npz), "--rounds", "2", "--rounds-dp", "2",
                 "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["quick"] is True and results["seeds"] == [0]
    assert results["dataset"] == "file:pneumonia-subset.npz" and len(results["dataset_md5"]) == 32
    assert set(results["arms"]) == {"centralized", "centralized_dp", "fl", "fl_dp"}
    for name, arm in results["arms"].items():
        for key in ("auc_mean", "auc_ci", "acc_mean", "wall_seconds", "bytes_sent"):
            assert key in arm, (name, key)
        lo, hi = arm["auc_ci"]
        assert 0.0 <= arm["auc_mean"] <= 1.0, (name, arm["auc_mean"])
        assert 0.0 <= lo <= hi <= 1.0
        assert 0.0 < arm["acc_mean"] <= 1.0
        assert arm["wall_seconds"] > 0 and arm["bytes_sent"] > 0
    for name in ("centralized_dp", "fl_dp"):
        assert results["arms"][name]["epsilon_spent_max"] <= 1.2 + 1e-6
    # FL traffic: encrypted updates up plus broadcasts down, measured from real encodings
    assert results["arms"]["fl"]["bytes_up"] > 0 and results["arms"]["fl"]["bytes_down"] > 0
    # who contributed to each version comes from the engine's signed version messages
    run = results["arms"]["fl"]["runs"][0]
    assert [v["version"] for v in run["versions"]] == [1, 2]
    assert all(len(v["contributors"]) == 3 for v in run["versions"])

    # a long run keeps what it measured: the arms of every landed seed, before the end
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["partial"] is True and partial["seeds"] == [0]
    assert partial["arms"]["fl_dp"]["auc_per_seed"] == results["arms"]["fl_dp"]["auc_per_seed"]
    assert set(partial["ratios"]) == {"fl_ratio", "fl_dp_ratio"}

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


@pytest.mark.parametrize("case", ["unknown", "missing", "md5"])
def test_dataset_registry_errors_are_clear(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown name, a missing file and a file failing its published MD5 each stop the run
    before any training, with a message saying what to do (exit code 2, a ConfigError)."""
    name = "pneumoniamnist"
    if case == "unknown":
        name = "chestmnist"  # multi-label: not in the binary registry
    elif case == "md5":
        (tmp_path / "pneumoniamnist.npz").write_bytes(b"not the published file")
    rc = main(["experiment", "reproduce", "--quick", "--dataset", name, "--data-root", str(tmp_path),
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "out" / "results.json").exists()
    expected = {"unknown": "unknown dataset 'chestmnist'", "missing": "not found: download https://zenodo.org",
                "md5": "not the published 28209eda62fecd6e6a2d98b1501bb15f"}[case]
    assert expected in err, err


def test_registered_file_passes_its_md5() -> None:
    from fedmq.experiments.datasets import REGISTRY, resolve

    root = _data_root()
    if root is None:
        pytest.skip("pneumoniamnist.npz not found (set FEDMQ_DATA_ROOT)")
    assert resolve("pneumoniamnist", root) == root / "pneumoniamnist.npz"
    assert {"pneumoniamnist", "breastmnist"} <= set(REGISTRY)


def test_multi_class_dataset_is_refused_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    np.savez(tmp_path / "bloodmnist.npz", train_images=np.zeros((4, 28, 28), np.uint8),
             train_labels=np.array([[0], [1], [2], [3]]), test_images=np.zeros((4, 28, 28), np.uint8),
             test_labels=np.array([[0], [1], [2], [3]]))
    rc = main(["experiment", "reproduce", "--quick", "--npz", str(tmp_path / "bloodmnist.npz"),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "binary" in capsys.readouterr().err
