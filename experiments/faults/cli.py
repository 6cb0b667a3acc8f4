"""``fedmq faults run``: fault injection on a live federation + fuzzing (``make faults``)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="faults_cmd", metavar="<command>", required=True)
    run = sub.add_parser("run", help="inject faults into live federations, fuzz the aggregator, write results.json")
    run.add_argument("--out", default="reports/faults", help="output folder (results.json, work/ with logs)")
    run.add_argument("--runs", type=int, default=1)
    run.add_argument("--kills", type=int, default=20, help="aggregator SIGKILLs per run")
    run.add_argument("--broker-restarts", type=int, default=1)
    run.add_argument("--connection-closes", type=int, default=1)
    run.add_argument("--site-kills", type=int, default=1, help="mid-publish site kills per run (0 or 1)")
    run.add_argument("--rounds", type=int, default=30, help="planned rounds per site")
    run.add_argument("--fuzz-examples", type=int, default=2000)
    run.add_argument("--amqp-fuzz", type=int, default=120)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--data-root", default=None, help="folder holding pneumoniamnist.npz (default $FEDMQ_DATA_ROOT)")
    run.set_defaults(handler=_run)


def _find_npz(root: str | None) -> Path:
    from fedmq.site_agent.data.medmnist_source import locate_medmnist

    base = root or os.environ.get("FEDMQ_DATA_ROOT") or None
    return locate_medmnist("pneumoniamnist", base, download_dir=None if base else Path("data"))


def _run(args: argparse.Namespace) -> int:
    from fedmq.experiments.faults import report
    from fedmq.experiments.faults.plan import FaultPlan
    from fedmq.experiments.faults.run import run_all  # imports the fuzzers: a missing dev extra stops here, at once

    plan = FaultPlan(aggregator_kills=args.kills, broker_restarts=args.broker_restarts, connection_closes=args.connection_closes,
                     site_mid_publish_kills=args.site_kills, planned_rounds=args.rounds, seed=args.seed)
    summary = run_all(Path(args.out), _find_npz(args.data_root), runs=args.runs, plan=plan,
                      fuzz_examples=args.fuzz_examples, amqp_fuzz=args.amqp_fuzz,
                      progress=lambda m: print(m, flush=True))
    for line in report.summary_lines(summary):
        print(line)
    for p in summary["problems"]:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(prog="fedmq faults")
    register(parser)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)
