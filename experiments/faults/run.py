"""``run_all``: everything ``fedmq faults run`` does, in order: the live runs
(``experiments.faults.live``), the fuzzers (``experiments.faults.fuzz``), then the judge's
verdict and the report (``experiments.faults.judge``, ``experiments.faults.report``).

The fuzz module is imported here, at the top, so a missing development dependency
(Hypothesis) stops the command before the long live run rather than after it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedmq.experiments.faults import fuzz, report
from fedmq.experiments.faults.live import run_live, small_slice
from fedmq.experiments.faults.plan import FaultPlan, LiveResult


def run_all(out_dir: Path, data_npz: Path, *, runs: int = 1, plan: FaultPlan | None = None, fuzz_examples: int = 2000,
            amqp_fuzz: int = 120, progress: Callable[[str], None] | None = None, workdir: Path | None = None) -> dict[str, Any]:
    """Runs everything and writes ``out_dir/results.json``; returns the summary written."""
    from fedmq.broker.local_node import LocalRabbitNode

    progress = progress or print
    plan = plan or FaultPlan()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = workdir or out_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    slice_npz = small_slice(data_npz, work / "pneumoniamnist-small.npz")
    results: list[LiveResult] = []
    for r in range(runs):
        p = FaultPlan(**{**asdict(plan), "seed": plan.seed + r})
        progress(f"live run {r + 1}/{runs} (seed {p.seed}): {p.aggregator_kills} aggregator kills, "
                 f"{p.broker_restarts} broker restart(s), {p.connection_closes} close_connection round(s), "
                 f"{p.site_mid_publish_kills} mid-publish site kill(s)")
        res = run_live(p, work / f"run-{r}", slice_npz, progress)
        results.append(res)
        progress(report.run_line(r + 1, res))
    progress(f"fuzzing AggregatorEngine.accept ({fuzz_examples} hypothesis examples)")
    fe = fuzz.fuzz_engine(work / "fuzz-engine", fuzz_examples)
    progress(f"fuzzing over AMQP ({amqp_fuzz} raw publishes to a running aggregator)")
    with LocalRabbitNode() as node:
        fa = fuzz.fuzz_amqp(node.amqp_url, work / "fuzz-amqp", amqp_fuzz)
    summary = report.summarize(results, fe, fa, plan, time.monotonic() - started)
    path = report.write(summary, out_dir)
    progress(f"wrote {path}: ok={summary['ok']}")
    return summary
