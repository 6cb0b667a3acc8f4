"""The async-vs-sync command's bookkeeping (no processes: a recorded run stands in for
``run_federation``; the real comparison is ``fedmq experiment async-vs-sync``, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fedmq.experiments.async_vs_sync import AsyncVsSyncConfig, run
from fedmq.experiments.evaluator import VersionScore
from fedmq.experiments.federation import FederationResult, FederationSpec


def _result(spec: FederationSpec) -> FederationResult:
    """Sync passes 0.845 at version 10 after 100 s, async at version 12 after 40 s."""
    step = 10.0 if spec.mode == "sync" else 40.0 / 12
    members = (("hospital_1", 0), ("hospital_2", 0), ("hospital_3", 0)) if spec.mode == "sync" else \
        (("hospital_1", 0), ("hospital_2", 1), ("hospital_1", 2))
    slope = 0.015 if spec.mode == "sync" else 0.0125
    scores = [VersionScore(v, v * step, 0.8, 0.70 + slope * v, 0.8, 0.5, 3, members=members) for v in range(1, 14)]
    return FederationResult(scores=scores, wall_seconds=13 * step, seconds_to_target=None, bytes_sent_by_site={},
                            bytes_broadcast_received=0, epsilon_by_site={}, updates_by_site={},
                            stop_reason="test", data_summary={})


def _npz(tmp_path: Path, n_train: int = 1000) -> Path:
    path = tmp_path / "x.npz"
    np.savez(path, train_labels=np.zeros(n_train))
    return path


def test_outputs_and_the_results_json_entry(tmp_path: Path) -> None:
    results = tmp_path / "reproduce" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"arms": {"fl": 1}, "async_vs_sync": {"source": "simulation"}}))
    cfg = AsyncVsSyncConfig(data_npz=_npz(tmp_path), out=tmp_path / "out", reproduce_results=results,
                            workdir=tmp_path / "w", seeds=2, target_auc=0.845)
    specs: list[FederationSpec] = []

    def fake(spec: FederationSpec) -> FederationResult:
        specs.append(spec)
        return _result(spec)

    entry = run(cfg, progress=lambda m: None, run_one=fake)
    # both arms share data, model, DP and budget; only the mode (and so K, and whether a site
    # starts its next round before a new version: FedBuff's clients do, sync refuses it) differs
    for a, s in zip(specs[1::2], specs[::2], strict=True):
        assert (a.mode, s.mode) == ("async", "sync") and a.seed == s.seed
        assert (a.train_continuously, s.train_continuously) == (True, False)
        mode_only = {"mode", "workdir", "train_continuously"}
        assert a.model_dump(exclude=mode_only) == s.model_dump(exclude=mode_only)
        assert a.slowdown == {"hospital_3": 4.0} and a.target_on == "test"
        assert a.training.local_steps == 3  # ceil(1000 images / 3 sites / batch 128): equal compute per round
    assert entry["source"] == "processes" and entry["seeds"] == [0, 1]
    assert entry["sync_seconds_to_target"] == 100.0 and abs(entry["async_seconds_to_target"] - 40.0) < 1e-9
    assert entry["speedup_sync_over_async"] == 2.5 and entry["target_needs_10_versions"]
    assert entry["diagnostics"]["async"]["mean_staleness"] == 1.0
    saved = json.loads(results.read_text())
    assert saved["arms"] == {"fl": 1} and saved["async_vs_sync"]["source"] == "processes"
    for key in ("async_seconds_to_target", "sync_seconds_to_target", "target_auc", "seeds"):
        assert key in saved["async_vs_sync"]
    assert (tmp_path / "out" / "async_vs_sync.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "async_vs_sync.json").read_text())["runs"][0]["curve"]
    table = (tmp_path / "out" / "async_vs_sync.md").read_text().splitlines()
    assert [r.split("|")[1].strip() for r in table[2:]] == ["0", "1", "mean"]
    assert "| 100 | 40 | 2.50x |" in table[-1]


def test_a_target_not_reached_is_none_not_a_number(tmp_path: Path) -> None:
    cfg = AsyncVsSyncConfig(data_npz=_npz(tmp_path), out=tmp_path / "out", reproduce_results=None,
                            workdir=tmp_path / "w", seeds=1, target_auc=0.99)
    entry = run(cfg, progress=lambda m: None, run_one=_result)
    assert entry["async_seconds_to_target"] is None and entry["sync_seconds_to_target"] is None
    assert entry["speedup_sync_over_async"] is None and not entry["target_needs_10_versions"]


def test_async_k_follows_the_documented_rule(tmp_path: Path) -> None:
    from fedmq.experiments.defaults import async_buffer_size

    assert [async_buffer_size(n, dp=True) for n in (1, 3, 5)] == [1, 3, 5]
    assert [async_buffer_size(n, dp=False) for n in (1, 3, 4, 5)] == [1, 2, 2, 3]
    base = dict(data_npz=_npz(tmp_path), workdir=tmp_path / "w")
    assert AsyncVsSyncConfig(**base).spec("async", 0).buffer_size == 3  # DP on by default
    assert AsyncVsSyncConfig(**base, dp_enabled=False).spec("async", 0).buffer_size == 2
    assert AsyncVsSyncConfig(**base, buffer_size=5).spec("async", 0).buffer_size == 5
