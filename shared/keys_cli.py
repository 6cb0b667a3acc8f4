"""``fedmq keys``: CKKS contexts, per-site and aggregator hybrid (Ed25519 + ML-DSA-65) signing keys."""

from __future__ import annotations

import argparse

from shared.ckks import DEFAULT_PRESET, PRESETS


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    init = sub.add_parser(
        "init",
        help="create a CKKS key: a secret context for the sites, a public one for the aggregator",
    )
    init.add_argument("--out", required=True, help="directory to write the key files into")
    init.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    init.set_defaults(handler=_init)
    site = sub.add_parser("site", help="create a site's hybrid Ed25519 + ML-DSA-65 signing key pair")
    site.add_argument("--site-id", required=True)
    site.add_argument("--out", required=True)
    site.set_defaults(handler=_site)
    agg = sub.add_parser(
        "aggregator", help="create the aggregator's hybrid signing key pair (it signs versions and audit records)"
    )
    agg.add_argument("--out", required=True)
    agg.set_defaults(handler=_aggregator)


def _init(args: argparse.Namespace) -> int:
    from shared.ckks import init_keys

    files = init_keys(args.out, args.preset)
    print(f"key fingerprint: {files.fingerprint}")
    print(f"{files.secret_context}: SECRET. Copy to every hospital's site agent only (mode 0600).")
    print(f"{files.public_context}: public evaluation context. Give to the aggregator; it cannot decrypt.")
    return 0


def _site(args: argparse.Namespace) -> int:
    from shared.signing import generate_site_key

    priv, pub = generate_site_key(args.out, args.site_id)
    print(f"{priv}: private signing key; stays at the hospital.")
    print(f"{pub}: public key; pin it at the aggregator (its --site-keys directory).")
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    from shared.signing import generate_aggregator_key, load_public_key

    priv, pub = generate_aggregator_key(args.out)
    print(f"{priv}: private signing key; stays at the aggregator (its signing_key setting).")
    print(f"{pub}: public key (fingerprint {load_public_key(pub).fingerprint}); give it to every site "
          f"(their aggregator_public_key setting): it is their trust anchor.")
    return 0
