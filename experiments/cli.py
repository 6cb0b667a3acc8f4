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
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; 1 with --quick)")
    p.add_argument("--dataset", default="pneumoniamnist",
                   help="a MedMNIST 2D binary task (experiments/datasets.py: pneumoniamnist, breastmnist); "
                   "<data root>/<name>.npz, checked against its published MD5")
    p.add_argument("--npz", type=Path, default=None,
                   help="an npz in the official MedMNIST format outside the registry, run as given (MD5 recorded)")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding <dataset>.npz (default $FEDMQ_DATA_ROOT)")
    p.add_argument("--out", type=Path, default=Path("reports/reproduce"))
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default 1)")
    p.add_argument("--jobs", type=int, default=None, help="seeds run in parallel processes (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="override rounds per site (non-DP arms)")
    p.add_argument("--rounds-dp", type=int, default=None, help="override rounds per site (DP arms)")
    p.add_argument("--preset", choices=("small_cnn", "scatternet", "resnet18", "resnet50"), default=None,
                   help="the model of every arm (default: experiments.defaults.model_preset)")
    p.set_defaults(handler=_reproduce)

    s = sub.add_parser(
        "sparsity",
        help="test AUC against versions for top-k 1.0 / 0.5 / 0.25 / 0.1 at the reproduction's FL + DP settings",
        description="Runs the reproduction's FL + DP arm (experiments/reproduce.py settings) once per top-k level "
        "and seed (experiments/sparsity.py) and writes <out>/sparsity.json and sparsity.png, with the level "
        "picked by the validation rule (fewest wire bytes within 1 AUC point of dense).",
    )
    s.add_argument("--seeds", type=int, default=2)
    s.add_argument("--levels", type=float, nargs="+", default=None, help="top-k fractions (default 1.0 0.5 0.25 0.1)")
    s.add_argument("--dataset", default="pneumoniamnist", help="a registered MedMNIST 2D binary task")
    s.add_argument("--data-root", type=Path, default=None, help="folder holding the dataset (default $FEDMQ_DATA_ROOT)")
    s.add_argument("--npz", type=Path, default=None, help="an unregistered npz in the official format, run as given")
    s.add_argument("--rounds-dp", type=int, default=None, help="override rounds per site (default: the reproduction's)")
    s.add_argument("--out", type=Path, default=Path("reports/reproduce"))
    s.set_defaults(handler=_sparsity)

    q = sub.add_parser(
        "async-vs-sync",
        help="async (FedBuff) vs sync (FedAvg) time to a test-AUC target on real processes, one site slower",
        description="Per seed and mode: a private broker, the aggregator and the site agents as processes "
        "(experiments/async_vs_sync.py). Writes <out>/async_vs_sync.{json,png} and the async_vs_sync entry "
        "of the reproduction's results.json. Minutes per run: for a quiet machine, not for CI.",
    )
    q.add_argument("--dataset", default="pneumoniamnist", help="a registered MedMNIST 2D binary task")
    q.add_argument("--data-root", type=Path, default=None, help="folder holding the dataset (default $FEDMQ_DATA_ROOT)")
    q.add_argument("--npz", type=Path, default=None, help="an unregistered npz in the official format, run as given")
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--target-auc", type=float, default=0.85, help="test AUC to reach (should need >= 10 versions)")
    q.add_argument("--rounds", type=int, default=None, help="updates each site may send (its DP budget covers them)")
    q.add_argument("--buffer-size", type=int, default=None, help="async K (default: the number of sites)")
    q.add_argument("--slow-factor", type=float, default=4.0)
    q.add_argument("--preset", choices=("small_cnn", "scatternet"), default=None,
                   help="the sites' model (default: the experiment's, small_cnn)")
    q.add_argument("--no-dp", action="store_true", help="both modes without DP (same on both sides)")
    q.add_argument("--steps-rule", choices=("equal", "epochs"), default="equal",
                   help="equal: the same local steps per round at every site (default); epochs: one local epoch")
    q.add_argument("--time-limit", type=float, default=900.0, help="seconds per run before it stops")
    q.add_argument("--out", type=Path, default=Path("reports/async_vs_sync"))
    q.add_argument("--results", type=Path, default=Path("reports/reproduce/results.json"),
                   help="results.json whose async_vs_sync entry is set (other keys kept)")
    q.add_argument("--workdir", type=Path, default=Path("var/async-vs-sync"))
    q.add_argument("--amqp-url", default=None, help="an existing broker instead of private nodes")
    q.set_defaults(handler=_async_vs_sync)


def _reproduce(args: argparse.Namespace) -> int:
    from fedmq.shared.errors import ConfigError

    from fedmq.experiments.reproduce import ReproduceConfig, run_reproduce
    from fedmq.experiments.datasets import DatasetError
    from fedmq.experiments.simulation import UnsupportedDataset

    logging.basicConfig(level=logging.WARNING)
    overrides: dict = {"dataset": args.dataset, "data_root": args.data_root,
                       "npz": args.npz}
    for key in ("seeds", "threads", "jobs", "rounds", "rounds_dp", "preset"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    cfg = ReproduceConfig.quick_config(**overrides) if args.quick else ReproduceConfig(**overrides)
    try:
        run_reproduce(cfg, args.out, log=lambda m: print(m, flush=True))
    except (DatasetError, UnsupportedDataset) as exc:
        raise ConfigError(str(exc)) from exc
    return 0


def _sparsity(args: argparse.Namespace) -> int:
    from fedmq.shared.errors import ConfigError

    from fedmq.experiments.datasets import DatasetError
    from fedmq.experiments.reproduce import ReproduceConfig
    from fedmq.experiments.simulation import UnsupportedDataset
    from fedmq.experiments.sparsity import LEVELS, run_sparsity

    logging.basicConfig(level=logging.WARNING)
    over: dict = {"dataset": args.dataset, "data_root": args.data_root, "npz": args.npz, "seeds": args.seeds}
    if args.rounds_dp is not None:
        over["rounds_dp"] = args.rounds_dp
    levels = tuple(args.levels) if args.levels else LEVELS
    if not any(lv >= 1.0 for lv in levels):
        raise ConfigError("--levels must include 1.0 (dense): the pick is measured against it")
    try:
        run_sparsity(ReproduceConfig(**over), args.out, levels=levels, log=lambda m: print(m, flush=True))
    except (DatasetError, UnsupportedDataset) as exc:
        raise ConfigError(str(exc)) from exc
    return 0


def _async_vs_sync(args: argparse.Namespace) -> int:
    from fedmq.shared.errors import ConfigError

    from fedmq.experiments.async_vs_sync import AsyncVsSyncConfig, run
    from fedmq.experiments.datasets import DatasetError
    from fedmq.experiments.reproduce import ReproduceConfig, npz_path

    logging.basicConfig(level=logging.WARNING)
    try:
        npz = npz_path(ReproduceConfig(dataset=args.dataset, data_root=args.data_root, npz=args.npz))
    except DatasetError as exc:
        raise ConfigError(str(exc)) from exc
    over: dict = {}
    if args.rounds is not None:
        over["planned_rounds"] = args.rounds
    if args.buffer_size is not None:
        over["buffer_size"] = args.buffer_size
    if args.preset is not None:
        over["training"] = AsyncVsSyncConfig.model_fields["training"].default.model_copy(
            update={"model_preset": args.preset})
    cfg = AsyncVsSyncConfig(
        data_npz=npz, out=args.out, reproduce_results=args.results, workdir=args.workdir, seeds=args.seeds,
        slow_factor=args.slow_factor, dp_enabled=not args.no_dp, target_auc=args.target_auc,
        time_limit_s=args.time_limit, amqp_url=args.amqp_url, steps_rule=args.steps_rule, **over,
    )
    run(cfg, progress=lambda m: print(m, flush=True))
    return 0
