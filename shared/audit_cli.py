"""``fedmq audit``: check an audit chain offline, print who contributed what, prove inclusion.

``verify`` reads a chain file (the aggregator's, or the copy a site keeps in its state
directory), checks every record's hybrid signature against the aggregator's public key and
every hash link, and prints per-site tables: the contributions folded into each version and
the epsilon each site had reported. ``prove`` answers "was update U folded into version v?"
from a site's state directory, comparing the ciphertext digest the site recorded when it
built U with the one the aggregator signed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedmq.shared.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    ver = sub.add_parser("verify", help="verify a whole audit chain and print per-site tables")
    src = ver.add_mutually_exclusive_group(required=True)
    src.add_argument("--chain", help="an audit-chain*.log file")
    src.add_argument("--state-dir", help="a site's (or the aggregator's) state directory")
    ver.add_argument("--aggregator-key", required=True, help="the aggregator's public key (aggregator.hybrid.pub)")
    ver.add_argument("--site", action="append", help="only this site's table (repeatable)")
    ver.add_argument("--json", action="store_true", help="machine-readable output")
    ver.set_defaults(handler=_verify)
    prove = sub.add_parser("prove", help="prove that an update was, or was not, folded into a version")
    prove.add_argument("--state-dir", required=True, help="the site's state directory")
    prove.add_argument("--aggregator-key", required=True)
    prove.add_argument("--update-id", required=True)
    prove.add_argument("--version", type=int, help="the version to check (default: the one that lists it)")
    prove.set_defaults(handler=_prove)


def chain_paths(state_dir: str | Path) -> list[Path]:
    paths = sorted(Path(state_dir).glob("audit-chain*.log"))
    if not paths:
        raise ConfigError(f"no audit-chain*.log in {state_dir}")
    return paths


def _load(path: Path, key_path: str):  # type: ignore[no-untyped-def]
    from fedmq.shared.audit import ChainFile, load_chain
    from fedmq.shared.signing import load_public_key

    key = load_public_key(key_path)
    records = ChainFile(path).read()
    shard = records[0].shard_index if records else 0
    return load_chain(path, key, shard, anchor_ok=True)


def tables(records, sites: list[str] | None = None, markdown: bool = False) -> str:  # type: ignore[no-untyped-def]
    """Per-site contribution tables, then epsilon per version: text or markdown."""
    all_sites = sorted({c.site_id for r in records for c in r.contributions} | {e.site_id for r in records for e in r.epsilons})
    shown = [s for s in all_sites if not sites or s in sites]
    out: list[str] = []

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |" if markdown else "  ".join(f"{c:<14}" for c in cells).rstrip()

    def head(cells: list[str]) -> list[str]:
        lines = [row(cells)]
        lines.append("|" + "---|" * len(cells) if markdown else "-" * (16 * len(cells)))
        return lines

    for site in shown:
        out.append(f"{'#### ' if markdown else ''}{site}: contributions")
        out += head(["version", "update_id", "digest", "weight_units", "staleness", "base_version"])
        n = 0
        for r in records:
            for c in r.contributions:
                if c.site_id == site:
                    n += 1
                    out.append(row([str(r.version), c.update_id, c.ciphertext_digest[:12], str(c.weight_units),
                                    str(c.staleness), str(c.base_version)]))
        if not n:
            out.append("(no contribution)")
        out.append("")
    out.append(f"{'#### ' if markdown else ''}epsilon reported, per version")
    out += head(["version", *shown])
    for r in records:
        eps = {e.site_id: e for e in r.epsilons}
        out.append(row([str(r.version), *(f"{eps[s].epsilon_spent:.3f}" if s in eps else "-" for s in shown)]))
    return "\n".join(out)


def _verify(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    paths = [Path(args.chain)] if args.chain else chain_paths(args.state_dir)
    summaries = []
    for path in paths:
        chain = _load(path, args.aggregator_key)
        summaries.append((path, chain))
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps([
            {"file": str(p), "versions": [c.base + 1, c.head], "head_hash": c.head_hash, "records": [
                json.loads(r.model_dump_json(exclude={"signature"})) for r in c.records]}
            for p, c in summaries
        ], indent=1))
        return 0
    for path, chain in summaries:
        first = chain.base + 1
        print(f"{path}: OK, versions {first}..{chain.head} ({len(chain.records)} records, every signature "
              f"and hash link verified{'; joined at version ' + str(first) if first > 1 else ''}), "
              f"head {chain.head_hash[:16]}")
        if chain.records:
            print(tables(chain.records, args.site))
    print(f"verified in {seconds:.3f} s")
    return 0


def _prove(args: argparse.Namespace) -> int:
    from fedmq.shared.audit import find_update, load_own_updates, prove_inclusion

    own = load_own_updates(args.state_dir).get(args.update_id)
    digest = own["digest"] if own else None
    if own is None:
        print(f"note: {args.update_id} is not among this site's own updates; its digest cannot be compared")
    for path in chain_paths(args.state_dir):
        chain = _load(path, args.aggregator_key)
        version = args.version if args.version is not None else find_update(chain, args.update_id)
        if version is None:
            print(f"{path}: {args.update_id} is in none of versions {chain.base + 1}..{chain.head} (each record "
                  f"lists every update folded into its version, signed by the aggregator)")
            continue
        proof = prove_inclusion(chain, version, args.update_id, digest)
        print(f"{path}: {proof.describe()}")
        if proof.included and proof.digest_matches is False:
            return 1
    return 0
