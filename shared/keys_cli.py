"""``fedmq keys``: CKKS contexts, per-site and aggregator hybrid (Ed25519 + ML-DSA-65) signing keys."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fedmq.shared.ckks import DEFAULT_PRESET, PRESETS
from fedmq.shared.errors import ConfigError


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    init = sub.add_parser(
        "init",
        help="create a CKKS key: a secret context for the sites, a public one for the aggregator",
    )
    init.add_argument("--out", required=True, help="directory for the SECRET context (hospitals only)")
    init.add_argument("--public-out", help="directory for the public context (the aggregator's); default: --out")
    init.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    init.set_defaults(handler=_init)
    site = sub.add_parser("site", help="create a site's hybrid Ed25519 + ML-DSA-65 signing key pair")
    site.add_argument("--site-id", required=True)
    site.add_argument("--out", required=True, help="directory for the PRIVATE signing key (stays at the hospital)")
    site.add_argument("--public-out", help="directory for the public key (the aggregator's site_keys_dir); default: --out")
    site.set_defaults(handler=_site)
    agg = sub.add_parser(
        "aggregator", help="create the aggregator's hybrid signing key pair (it signs versions and audit records)"
    )
    agg.add_argument("--out", required=True)
    agg.set_defaults(handler=_aggregator)


def _move_public(path: Path, public_out: str | None, *copies: Path) -> Path:
    """Move a public file into its own folder (copying ``copies`` beside it), so the folder that
    holds secrets never needs to be handed to anyone."""
    if not public_out:
        return path
    dest = Path(public_out)
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / path.name).exists():
        raise ConfigError(f"{dest / path.name} exists; refusing to overwrite key material")
    for f in copies:
        shutil.copy2(f, dest / f.name)
    path.replace(dest / path.name)
    return dest / path.name


def _init(args: argparse.Namespace) -> int:
    from fedmq.shared.ckks import FINGERPRINT_FILE, init_keys

    files = init_keys(args.out, args.preset)
    public = _move_public(files.public_context, args.public_out, Path(args.out) / FINGERPRINT_FILE)
    print(f"key fingerprint: {files.fingerprint}")
    print(f"SECRET  {files.secret_context}")
    print("        every hospital's site agent only (mode 0600): site TOML key `secret_context`")
    print(f"public  {public}")
    print("        the aggregator only (it cannot decrypt): aggregator TOML key `public_context`")
    if not args.public_out:
        print("note: both files are in one folder; give the aggregator only the public one "
              "(--public-out DIR puts it in a folder of its own)")
    return 0


def _site(args: argparse.Namespace) -> int:
    from fedmq.shared.signing import generate_site_key

    priv, pub = generate_site_key(args.out, args.site_id)
    pub = _move_public(pub, args.public_out)
    print(f"PRIVATE {priv}")
    print("        stays at the hospital (mode 0600): site TOML key `signing_key`")
    print(f"public  {pub}")
    print(f"        pin it at the aggregator: copy into the folder of the aggregator TOML key `site_keys_dir` "
          f"(site id {args.site_id!r} = its broker user)")
    return 0


def _aggregator(args: argparse.Namespace) -> int:
    from fedmq.shared.signing import generate_aggregator_key, load_public_key

    priv, pub = generate_aggregator_key(args.out)
    print(f"{priv}: private signing key; stays at the aggregator (its signing_key setting).")
    print(f"{pub}: public key (fingerprint {load_public_key(pub).fingerprint}); give it to every site "
          f"(their aggregator_public_key setting): it is their trust anchor.")
    return 0
