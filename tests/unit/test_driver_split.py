"""The fault driver and the benchmarks as run / judge / report: the judge reads the plan's
bounds and the one goals table, and a missing development dependency stops ``fedmq faults
run`` before any live run starts."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import goals, judge, report
from fedmq.experiments.faults.plan import FaultPlan, LiveResult


def _live(**over: object) -> LiveResult:
    base = dict(seed=0, wall_seconds=1.0, kills=1, broker_restarts=0, connection_closes=0, connections_closed=0,
                site_mid_publish_kills=0, updates_built=2, updates_confirmed=2, updates_counted=2, lost=[],
                duplicates=[], counted_unconfirmed=[], partial_pending=[], final_version=1, model_max_abs_error=0.0,
                min_update_contribution=1.0, sites_agree_with_aggregator=True, epsilon_by_site={"a": 1.0},
                epsilon_target=1.2, recovery_seconds={"aggregator_restart": [3.0]}, first_accept_after_restart_s=[],
                max_recovery_seconds=3.0, dead_letters={}, observed_versions=1, contributor_weight_mismatches=0,
                unexpected_exits=[])
    base.update(over)
    return LiveResult(**base)  # type: ignore[arg-type]


def test_the_judge_fails_a_run_whose_recovery_exceeds_the_plans_bound() -> None:
    assert _live(max_recovery_seconds=3.0, max_recovery_bound_s=5.0).problems() == []
    (problem,) = _live(max_recovery_seconds=6.0, max_recovery_bound_s=5.0).problems()
    assert "recovery took 6.0s" in problem and "5.0s" in problem
    assert FaultPlan(max_recovery_s=5.0).max_recovery_s == 5.0
    assert not _live(lost=["a:1"]).ok and not _live(epsilon_by_site={"a": 1.3}).ok


def test_faults_run_stops_before_the_live_run_without_hypothesis(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import fedmq.experiments.faults.live as live
    from fedmq.shared import cli

    def no_live_run(*a: object, **k: object) -> None:
        raise AssertionError("the live run started although the fuzzers cannot run")

    monkeypatch.setattr(live, "run_live", no_live_run)
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # as if the dev extra were not installed
    import fedmq.experiments.faults as package

    for name in ("fuzz", "run"):  # as in a fresh process: neither imported yet
        monkeypatch.delitem(sys.modules, f"fedmq.experiments.faults.{name}", raising=False)
        monkeypatch.delattr(package, name, raising=False)
    rc = cli.main(["faults", "run", "--out", str(tmp_path / "out"), "--data-root", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "Hypothesis" in err and "dev extra" in err
    assert not (tmp_path / "out").exists()


def test_benchmark_goals_are_one_table_for_judge_and_report() -> None:
    judged = [g for g in goals.GOALS if g.op is not None]
    result = {"machine": {"cpus": 2}, "aggregator_vs_floor": 0.6, "shard_speedup_2": 1.2,
              "signatures": {"site_sign_plus_verify_share_of_training": 0.01}}
    v = judge.verdicts(result)
    assert set(v) == {g.key for g in judged} == set(goals.goal_texts())
    assert v["aggregator_vs_floor"]["met"] is True and v["shard_speedup_2"]["met"] is False
    assert v["hybrid_sign_verify_share_of_site_round"] == {"value": 0.01, "met": True}
    assert v["ckks_bytes_per_value"]["met"] is None  # no figure: no verdict, not a pass
    rows = report.goal_rows({**result, "verdicts": v})
    assert len(rows) == len(goals.GOALS) + 1  # + the GPU row
    for g in goals.GOALS:
        assert any(f"| {g.text} |" in row for row in rows), g.key
    # a changed bound changes the verdict: the judge reads the table, not a copy of it
    tighter = replace(goals.BY_KEY["aggregator_vs_floor"], bound=0.7)
    assert tighter.met_by(0.6) is False


def test_bench_parameter_counts_come_from_the_model_registry() -> None:
    from benchmarks.run import Sizes, model_params
    from fedmq.site_agent.models import PRESETS

    for name in Sizes.full().model_presets:
        assert model_params(name) == PRESETS[name].n_params
    assert Sizes.full().resnet50_params == PRESETS["resnet50"].n_params


def test_bench_async_vs_sync_reads_no_earlier_results(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The section's only input is the dataset: the comparison it runs is told to read and write
    no earlier results file (``reproduce_results=None``)."""
    import fedmq.experiments.async_vs_sync as avs
    from benchmarks import run
    from benchmarks.harness import data_npz

    if data_npz() is None:
        pytest.skip("pneumoniamnist.npz not found; set FEDMQ_DATA_ROOT")
    seen = []

    def fake_run(cfg: avs.AsyncVsSyncConfig, progress: object = None) -> dict:
        seen.append(cfg)
        return {"async_seconds_to_target": 10.0, "sync_seconds_to_target": 25.0, "runs": []}

    monkeypatch.setattr(avs, "run", fake_run)
    out = run.async_vs_sync(run.Sizes.tiny(), tmp_path)
    (cfg,) = seen
    assert cfg.reproduce_results is None
    assert cfg.data_npz.is_relative_to(tmp_path)  # the seeded slice it made, not a file of an earlier run
    assert out["async_vs_sync_speedup"] == 2.5
