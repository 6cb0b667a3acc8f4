"""``fedmq demo``: the three-hospital federation, end to end, with a report."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="reports/demo", help="report directory (report.md, results.json, plots)")
    parser.add_argument("--workdir", default="var/demo", help="runtime state: broker data, keys, hospital images, logs")
    parser.add_argument("--data-root", default=None, help="folder with pneumoniamnist.npz (default $FEDMQ_DATA_ROOT, else download)")
    parser.add_argument("--amqp-url", default=None, help="use this broker instead of starting a private node (default $FEDMQ_AMQP_URL)")
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds of federation before stopping")
    parser.add_argument("--target-auc", type=float, default=None, help="stop once validation AUC reaches this")
    parser.add_argument("--rounds", type=int, default=None, help="updates each site contributes (the DP budget covers them)")
    parser.add_argument("--epsilon", type=float, default=1.2)
    parser.add_argument("--no-dp", action="store_true", help="FL without differential privacy")
    parser.add_argument("--buffer-size", type=int, default=None, help="K: updates the aggregator folds per version")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from fedmq.experiments.demo import run_demo

    return run_demo(args)
