"""``fedmq experiment``: reproduce the reference study."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="experiment_command", metavar="<command>", required=True)
    p = sub.add_parser(
        "reproduce",
        help="centralized vs FL vs FL + DP (epsilon 1.2), and async vs sync with a straggler",
        description="Runs the in-process federation (the shipped trainer, update builder and AggregatorEngine; "
        "CKKS-encrypted, no broker) "
        "and writes results.json, report.md and plots.",
    )
    p.add_argument("--quick", action="store_true", help="one seed, few rounds (about 4 minutes on 2 cores)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    p.add_argument("--dataset", default="pneumoniamnist",
                   help="a MedMNIST 2D binary task (experiments/datasets.py: pneumoniamnist, breastmnist); "
                   "<data root>/<name>.npz, checked against its published MD5")
    p.add_argument("--npz", type=Path, default=None,
                   help="an npz in the official MedMNIST format outside the registry, run as given (MD5 recorded)")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding <dataset>.npz (default $FEDMQ_DATA_ROOT)")
    p.add_argument("--out", type=Path, default=Path("reports/reproduce"))
    p.add_argument("--real-async-vs-sync", action="store_true",
                   help="time-to-target on a real broker + aggregator + site processes (experiments.federation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="seeds run in parallel processes (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="override rounds per site (non-DP arms)")
    p.add_argument("--rounds-dp", type=int, default=None, help="override rounds per site (DP arms)")
    p.set_defaults(handler=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from shared.errors import ConfigError

    from experiments.reproduce import ReproduceConfig, run_reproduce
    from experiments.datasets import DatasetError
    from experiments.simulation import UnsupportedDataset

    logging.basicConfig(level=logging.WARNING)
    overrides: dict = {"dataset": args.dataset, "data_root": args.data_root,
                       "npz": args.npz,
                       "real_async_vs_sync": args.real_async_vs_sync}
    for key in ("seeds", "threads", "jobs", "rounds", "rounds_dp"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    cfg = ReproduceConfig.quick_config(**overrides) if args.quick else ReproduceConfig(**overrides)
    try:
        run_reproduce(cfg, args.out, log=lambda m: print(m, flush=True))
    except (DatasetError, UnsupportedDataset) as exc:
        raise ConfigError(str(exc)) from exc
    return 0
