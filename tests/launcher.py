"""Run a fedmq service in its own process with test hooks injected, never switched on by a variable.

The product has seams (``AggregatorEngine(crash_hook=)``, ``SiteAgent(chunk_published_hook=)``,
``SiteRuntime.update_built_hook``) but no code that fills them: an installed fedmq cannot be
made to crash on purpose or to write a plaintext update. Tests that need a *process* to die at
a precise point (kill -9 is the fault being tested) start it through this module instead:

    python -m tests.launcher --crash-at after-wal:5 -- aggregator run --state-dir S ...
    python -m tests.launcher --record-plaintext --crash-mid-publish 2 -- site run --config C.toml

Everything after ``--`` is an ordinary ``fedmq`` command line; the launcher builds the same
settings the CLI would and hands the service its hooks. It needs the repository root on
``sys.path`` (``python -m`` from the root, or ``PYTHONPATH``), which only a checkout has.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("tests.launcher")

#: ``python -m`` module name and the repository root to put on PYTHONPATH, for callers
MODULE = "tests.launcher"
ROOT = Path(__file__).resolve().parents[1]


def _sigkill(what: str) -> None:
    logger.warning("test hook: SIGKILL %s", what)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    """Aggregator crash hook: SIGKILL the n-th time execution reaches ``point``."""

    def __init__(self, spec: str) -> None:
        from fedmq.aggregator.engine import CRASH_POINTS

        point, _, count = spec.partition(":")
        if point not in CRASH_POINTS:
            raise SystemExit(f"--crash-at: unknown point {point!r}; one of {CRASH_POINTS}")
        self.point, self.remaining = point, int(count or 1)

    def __call__(self, point: str) -> None:
        if point == self.point:
            self.remaining -= 1
            if self.remaining <= 0:
                _sigkill(f"at {point}")


class KillMidPublish:
    """Site hook: SIGKILL the n-th time the first chunk of a multi-chunk update was confirmed."""

    def __init__(self, n: int) -> None:
        self.remaining = n

    def __call__(self, index: int, count: int) -> None:
        if index == 0 and count > 1:
            self.remaining -= 1
            if self.remaining == 0:
                _sigkill("mid-publish")


def record_plaintext(runtime: Any, seq: int, delta: np.ndarray, base_version: int, sample_weight: float) -> None:
    """Site hook: write the exact sparse blocks update ``seq`` encrypts to
    ``<state_dir>/plaintext/<seq>.npz``, so a fault test can replay what was sent."""
    from fedmq.shared.atomic import atomic_write_bytes
    from fedmq.shared.sparsify import sparsify

    s = runtime.settings
    sparse, _ = sparsify(delta, runtime.owner.residual(), runtime.ctx.block_size, s.sparsity_mode, s.topk_fraction)
    buf = io.BytesIO()
    np.savez(buf, indices=np.asarray(sparse.indices, dtype=np.int64), blocks=sparse.blocks,
             base_version=base_version, sample_weight=sample_weight)
    atomic_write_bytes(runtime.store.dir / "plaintext" / f"{seq}.npz", buf.getvalue())


def _run_aggregator(args: argparse.Namespace, hooks: argparse.Namespace) -> int:
    from fedmq.aggregator.cli import run_settings
    from fedmq.aggregator.consumer import AggregatorService
    from fedmq.aggregator.engine import AggregatorEngine
    from fedmq.shared.log import configure_logging

    settings = run_settings(args)
    configure_logging(settings.log_level, settings.log_json, component="aggregator")
    engine = AggregatorEngine(settings, crash_hook=KillAt(hooks.crash_at) if hooks.crash_at else None)
    return AggregatorService(settings, engine).run()


def _run_site(args: argparse.Namespace, hooks: argparse.Namespace) -> int:
    from fedmq.shared.log import configure_logging
    from fedmq.shared.settings import load_settings
    from fedmq.site_agent.runtime import SiteRuntime
    from fedmq.site_agent.service import SiteAgent
    from fedmq.site_agent.settings import SiteSettings

    settings = load_settings(SiteSettings, args.config)
    configure_logging(settings.log_level, settings.log_json, component=f"site:{settings.site_id}")
    runtime = SiteRuntime.open(settings)
    if hooks.record_plaintext:
        runtime.update_built_hook = record_plaintext
    hook = KillMidPublish(hooks.crash_mid_publish) if hooks.crash_mid_publish else None
    agent = SiteAgent(settings, runtime, chunk_published_hook=hook)
    agent.install_signal_handlers()
    agent.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m tests.launcher [hooks] -- <fedmq command line>")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m tests.launcher")
    parser.add_argument("--crash-at", help="aggregator: POINT[:N], SIGKILL the N-th time POINT is reached")
    parser.add_argument("--crash-mid-publish", type=int, default=0, help="site: SIGKILL after the first chunk of the N-th multi-chunk update")
    parser.add_argument("--record-plaintext", action="store_true", help="site: record each update's sparse plaintext")
    hooks = parser.parse_args(argv[:split])

    from fedmq.shared.cli import build_parser

    args = build_parser().parse_args(argv[split + 1 :])
    if (args.group, args.command) == ("aggregator", "run"):
        return _run_aggregator(args, hooks)
    if (args.group, args.command) == ("site", "run"):
        return _run_site(args, hooks)
    raise SystemExit(f"tests.launcher runs 'aggregator run' or 'site run', not {args.group} {args.command}")


if __name__ == "__main__":
    sys.exit(main())
