"""Ed25519 signatures on update chunks, so a compromised broker cannot forge or alter one.

Each chunk is signed over its own msgpack encoding with an empty signature field; the chunk
header binds it to its update id, sequence number and declared block set, so chunks cannot
be moved between updates either. Replay is stopped by the aggregator's per-site sequence
check, which the signature makes unforgeable.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.atomic import atomic_write_bytes
from shared.codec import encode
from shared.errors import ConfigError, SignatureInvalid, UnknownSite
from shared.schema import UpdateChunk

_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def private_key_path(directory: str | Path, site_id: str) -> Path:
    return Path(directory) / f"{site_id}.ed25519"


def public_key_path(directory: str | Path, site_id: str) -> Path:
    return Path(directory) / f"{site_id}.ed25519.pub"


def generate_site_key(directory: str | Path, site_id: str) -> tuple[Path, Path]:
    """Write ``<site>.ed25519`` (0600, stays at the hospital) and ``<site>.ed25519.pub``."""
    if not _SITE_RE.match(site_id):
        raise ConfigError(f"invalid site id {site_id!r}")
    priv_path, pub_path = private_key_path(directory, site_id), public_key_path(directory, site_id)
    if priv_path.exists():
        raise ConfigError(f"{priv_path} exists; refusing to overwrite a site identity")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(
        priv_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    priv_path.chmod(0o600)
    atomic_write_bytes(
        pub_path,
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    return priv_path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load site signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load site public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def load_pinned_keys(directory: str | Path) -> dict[str, Ed25519PublicKey]:
    """Every ``<site>.ed25519.pub`` in a directory: the aggregator's list of known sites."""
    keys = {}
    for path in sorted(Path(directory).glob("*.ed25519.pub")):
        site = path.name.removesuffix(".ed25519.pub")
        if _SITE_RE.match(site):
            keys[site] = load_public_key(path)
    return keys


def signing_payload(chunk: UpdateChunk) -> bytes:
    return encode(chunk.model_copy(update={"signature": b""}))


def sign_chunk(chunk: UpdateChunk, key: Ed25519PrivateKey) -> UpdateChunk:
    return chunk.model_copy(update={"signature": key.sign(signing_payload(chunk))})


def verify_chunk(chunk: UpdateChunk, pinned: dict[str, Ed25519PublicKey]) -> None:
    key = pinned.get(chunk.site_id)
    if key is None:
        raise UnknownSite(f"no pinned public key for site {chunk.site_id!r}")
    try:
        key.verify(chunk.signature, signing_payload(chunk))
    except InvalidSignature:
        raise SignatureInvalid(f"signature of {chunk.update_id} chunk {chunk.chunk_index} does not verify") from None
