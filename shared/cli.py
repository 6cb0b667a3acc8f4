"""The ``fedmq`` command: one entry point, one sub-command group per component.

Each group lives with its component (``<package>/cli.py`` exposes ``register``); heavy
imports (torch, TenSEAL) happen inside the handlers so ``fedmq --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedmq.shared.errors import FedmqError

GROUPS: tuple[tuple[str, str, str], ...] = (
    ("broker", "fedmq.broker.cli", "broker topology, users and permissions, a private local node"),
    ("keys", "fedmq.shared.keys_cli", "create CKKS contexts and site and aggregator signing keys"),
    ("audit", "fedmq.shared.audit_cli", "verify a federation's audit chain offline; prove an update's inclusion"),
    ("aggregator", "fedmq.aggregator.cli", "the central consumer that folds encrypted updates"),
    ("site", "fedmq.site_agent.cli", "the hospital site agent and its data tools"),
    ("status", "fedmq.aggregator.status_cli", "the federation at a glance"),
    ("demo", "fedmq.experiments.demo_cli", "run the three-hospital demo federation"),
    ("experiment", "fedmq.experiments.cli", "reproduce the reference study"),
    ("faults", "fedmq.experiments.faults.cli", "fault injection on a live federation and fuzzing (make faults)"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq",
        description="Privacy-preserving federated learning for medical imaging over RabbitMQ: "
        "sites train with DP-SGD, send CKKS-encrypted sparse updates, and an aggregator that "
        "cannot decrypt folds them asynchronously.",
    )
    sub = parser.add_subparsers(dest="group", metavar="<group>", required=True)
    for name, module, help_text in GROUPS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # component not installed in this build
            raise
        mod.register(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.parse_args([args.group, "--help"])
        return 2
    try:
        return int(handler(args) or 0)
    except FedmqError as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
