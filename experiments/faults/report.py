"""The *report* half of ``fedmq faults run``: one summary of the live runs and the fuzzing,
written as ``results.json`` (the keys ``make faults`` has always written), and the lines the
command prints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedmq.experiments.faults.judge import verdict
from fedmq.experiments.faults.plan import FaultPlan, LiveResult

#: what ``fedmq faults run`` prints at the end, in this order
PRINTED_KEYS = ("runs", "kills", "updates_confirmed", "updates_counted", "lost", "duplicates", "max_recovery_seconds",
                "fuzz_cases", "wall_seconds")


def summarize(results: list[LiveResult], fuzz_engine: dict[str, Any], fuzz_amqp: dict[str, Any], plan: FaultPlan,
              wall_seconds: float) -> dict[str, Any]:
    """Totals over the live runs, the fuzzers' counts and the judge's verdict."""
    return {
        "runs": len(results),
        "kills": sum(r.kills for r in results),
        "broker_restarts": sum(r.broker_restarts for r in results),
        "connection_closes": sum(r.connection_closes for r in results),
        "connections_closed": sum(r.connections_closed for r in results),
        "site_mid_publish_kills": sum(r.site_mid_publish_kills for r in results),
        "updates_confirmed": sum(r.updates_confirmed for r in results),
        "updates_counted": sum(r.updates_counted for r in results),
        "lost": sum(len(r.lost) for r in results),
        "duplicates": sum(len(r.duplicates) for r in results),
        "max_recovery_seconds": max((r.max_recovery_seconds for r in results), default=0.0),
        "max_epsilon": max((e for r in results for e in r.epsilon_by_site.values()), default=0.0),
        "epsilon_target": plan.target_epsilon,
        "fuzz_engine_cases": fuzz_engine["cases"],
        "fuzz_amqp_cases": fuzz_amqp["cases"],
        "fuzz_cases": fuzz_engine["cases"] + fuzz_amqp["cases"],
        "fuzz_engine_reasons": fuzz_engine["reasons"],
        "fuzz_amqp_reasons": fuzz_amqp["reasons"],
        **verdict(results),
        "wall_seconds": round(wall_seconds, 1),
        "plan": asdict(plan),
        "run_details": [asdict(r) for r in results],
    }


def write(summary: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def run_line(index: int, r: LiveResult) -> str:
    return (f"run {index}: confirmed {r.updates_confirmed}, counted {r.updates_counted}, lost {len(r.lost)}, "
            f"duplicates {len(r.duplicates)}, max recovery {r.max_recovery_seconds:.1f}s; "
            f"problems: {r.problems() or 'none'}")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    return [f"{key}: {summary[key]}" for key in PRINTED_KEYS]
