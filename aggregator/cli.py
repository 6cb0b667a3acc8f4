"""``fedmq aggregator ...``: run the aggregator, inspect its state directory."""

from __future__ import annotations

import argparse
import json


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    run = sub.add_parser("run", help="consume, fold and publish (until SIGTERM)")
    run.add_argument("--config", help="TOML settings file (AggregatorSettings fields)")
    run.add_argument("--state-dir")
    run.add_argument("--amqp-url")
    run.add_argument("--public-context", help="public CKKS context (refused if it holds a secret key)")
    run.add_argument("--site-keys", dest="site_keys_dir", help="directory of pinned <site>.hybrid.pub files")
    run.add_argument("--signing-key", help="the aggregator's own aggregator.hybrid key (fedmq keys aggregator)")
    run.add_argument("--mode", choices=("async", "sync"))
    run.add_argument("--buffer-size", type=int, help="K: updates per version (async)")
    run.add_argument("--metrics-port", type=int)
    run.add_argument("--shard-index", type=int)
    run.add_argument("--shard-count", type=int)
    run.set_defaults(handler=_run)
    insp = sub.add_parser("inspect", help="print a summary of a state directory's checkpoint")
    insp.add_argument("--state-dir", required=True)
    insp.set_defaults(handler=_inspect)


def run_settings(args: argparse.Namespace):  # noqa: ANN201 - imported lazily
    """The settings ``aggregator run`` builds from its arguments (also used by tests/launcher.py)."""
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.shared.settings import load_settings

    return load_settings(
        AggregatorSettings, args.config, state_dir=args.state_dir, amqp_url=args.amqp_url,
        public_context=args.public_context, site_keys_dir=args.site_keys_dir, signing_key=args.signing_key,
        mode=args.mode,
        buffer_size=args.buffer_size, metrics_port=args.metrics_port, shard_index=args.shard_index,
        shard_count=args.shard_count,
    )


def _run(args: argparse.Namespace) -> int:
    from fedmq.aggregator.consumer import AggregatorService
    from fedmq.shared.log import configure_logging

    settings = run_settings(args)
    configure_logging(settings.log_level, settings.log_json, component="aggregator")
    return AggregatorService(settings).run()


def _inspect(args: argparse.Namespace) -> int:
    from fedmq.aggregator.checkpoint import load
    from fedmq.shared.errors import ConfigError

    cp = load(args.state_dir)
    if cp is None:
        raise ConfigError(f"no checkpoint in {args.state_dir}")
    summary = {
        "version": cp.version, "value_scale": cp.value_scale, "config": cp.config,
        "blocks": len(cp.blocks), "ciphertext_bytes": sum(len(b) for b in cp.blocks.values()),
        "site_seq": cp.site_seq, "wal_segment": cp.wal_segment, "created_at": cp.created_at,
    }
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
