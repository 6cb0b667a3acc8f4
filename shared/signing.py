"""Hybrid Ed25519 + ML-DSA-65 signatures: the one module that knows the signature algorithms.

Who signs what:
- each site signs every update chunk (pinned at the aggregator as ``<site>.hybrid.pub``);
- the aggregator signs every global-version chunk (delta or snapshot) and every audit record
  with its own key (``aggregator.hybrid``); every site pins ``aggregator.hybrid.pub``.

Why hybrid: Ed25519 falls to a large quantum computer, ML-DSA-65 (FIPS 204) is young. A
signature is a msgpack map holding both, over the same domain-separated message, and a
verifier requires **both** to verify: forging one needs breaking both schemes. A signature
with one half missing is refused by name ("ML-DSA-65 signature missing"), so a downgrade
(stripping the post-quantum half) is not silently accepted.

Hash, then sign: the signed message is ``b"fedmq/<domain>/v1\\0" + SHA-512(payload)``. The
payload (an update chunk: megabytes of ciphertext) is hashed once; both algorithms then sign
72 bytes. Signing the payload itself would make each algorithm hash it again (Ed25519 with
SHA-512, ML-DSA with SHAKE-256): measured, three passes over the ciphertext cost the aggregator
more than folding it. SHA-512's collision resistance (2^256 classical, ~2^171 quantum) keeps
the hybrid's strength. The domain prefix means an update signature can never pass as a version
or an audit-record signature. ``verify`` returns the digest so callers reuse it (the audit
log's ciphertext digests are built from it, with no further pass over the bytes).

Key files are PEM (PKCS#8 / SubjectPublicKeyInfo), one block per algorithm, Ed25519 first:
``<name>.hybrid`` (mode 0600, stays with its owner) and ``<name>.hybrid.pub``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.mldsa import MLDSA65PrivateKey, MLDSA65PublicKey

from fedmq.shared.atomic import atomic_write_bytes
from fedmq.shared.codec import encode
from fedmq.shared.errors import ConfigError, SignatureInvalid, UnknownSite
from fedmq.shared.schema import GlobalVersionChunk, UpdateChunk

_SITE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

ALGORITHM = "ed25519+ml-dsa-65"
KEY_SUFFIX = ".hybrid"
PUB_SUFFIX = ".hybrid.pub"
AGGREGATOR_KEY_NAME = "aggregator"
ED25519_SIG_BYTES = 64
MLDSA65_SIG_BYTES = 3309
#: a hybrid signature is never larger than this (msgpack map framing included)
MAX_SIGNATURE_BYTES = 4096
_HEADER = b"# fedmq hybrid signing key: Ed25519 + ML-DSA-65 (FIPS 204); both must verify\n"

Domain = Literal["update-chunk", "global-version", "audit-record"]


@dataclass(frozen=True)
class SigningKey:
    """A private hybrid key: one half per algorithm."""

    ed25519: Ed25519PrivateKey
    mldsa: MLDSA65PrivateKey

    def public_key(self) -> "VerifyKey":
        return VerifyKey(self.ed25519.public_key(), self.mldsa.public_key())


@dataclass(frozen=True)
class VerifyKey:
    """A public hybrid key; ``fingerprint`` names it in logs and audit output."""

    ed25519: Ed25519PublicKey
    mldsa: MLDSA65PublicKey

    @property
    def fingerprint(self) -> str:
        raw = self.ed25519.public_bytes_raw() + self.mldsa.public_bytes_raw()
        return hashlib.sha256(raw).hexdigest()[:16]


# ---------------------------------------------------------------------------------- key files


def private_key_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}{KEY_SUFFIX}"


def public_key_path(directory: str | Path, name: str) -> Path:
    return Path(directory) / f"{name}{PUB_SUFFIX}"


def new_signing_key() -> SigningKey:
    """A fresh in-memory hybrid key (simulations, benchmarks; services load theirs from files)."""
    return SigningKey(Ed25519PrivateKey.generate(), MLDSA65PrivateKey.generate())


def _write_pair(directory: str | Path, name: str) -> tuple[Path, Path]:
    priv_path, pub_path = private_key_path(directory, name), public_key_path(directory, name)
    if priv_path.exists():
        raise ConfigError(f"{priv_path} exists; refusing to overwrite a signing identity")
    key = new_signing_key()
    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    spki = (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(priv_path, _HEADER + key.ed25519.private_bytes(*pkcs8) + key.mldsa.private_bytes(*pkcs8))
    priv_path.chmod(0o600)
    pub = key.public_key()
    atomic_write_bytes(pub_path, _HEADER + pub.ed25519.public_bytes(*spki) + pub.mldsa.public_bytes(*spki))
    return priv_path, pub_path


def generate_site_key(directory: str | Path, site_id: str) -> tuple[Path, Path]:
    """Write ``<site>.hybrid`` (0600, stays at the hospital) and ``<site>.hybrid.pub``."""
    if not _SITE_RE.match(site_id):
        raise ConfigError(f"invalid site id {site_id!r}")
    return _write_pair(directory, site_id)


def generate_aggregator_key(directory: str | Path) -> tuple[Path, Path]:
    """Write ``aggregator.hybrid`` (0600, stays at the aggregator) and ``aggregator.hybrid.pub``
    (every site's trust anchor for versions, snapshots and audit records)."""
    return _write_pair(directory, AGGREGATOR_KEY_NAME)


def _pem_blocks(path: Path, data: bytes) -> list[bytes]:
    blocks = re.findall(rb"-----BEGIN [A-Z ]+-----\r?\n.*?-----END [A-Z ]+-----\r?\n?", data, re.S)
    if len(blocks) != 2:
        hint = " (an Ed25519-only key from an older fedmq? create a hybrid one with `fedmq keys`)" if len(blocks) == 1 else ""
        raise ConfigError(f"{path}: expected 2 PEM blocks (Ed25519 + ML-DSA-65), found {len(blocks)}{hint}")
    return blocks


def load_private_key(path: str | Path) -> SigningKey:
    path = Path(path)
    try:
        ed, ml = (serialization.load_pem_private_key(b, password=None) for b in _pem_blocks(path, path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load signing key {path}: {exc}") from None
    if not isinstance(ed, Ed25519PrivateKey) or not isinstance(ml, MLDSA65PrivateKey):
        raise ConfigError(f"{path} is not a hybrid private key (Ed25519 then ML-DSA-65)")
    return SigningKey(ed, ml)


def load_public_key(path: str | Path) -> VerifyKey:
    path = Path(path)
    try:
        ed, ml = (serialization.load_pem_public_key(b) for b in _pem_blocks(path, path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(ed, Ed25519PublicKey) or not isinstance(ml, MLDSA65PublicKey):
        raise ConfigError(f"{path} is not a hybrid public key (Ed25519 then ML-DSA-65)")
    return VerifyKey(ed, ml)


def load_pinned_keys(directory: str | Path) -> dict[str, VerifyKey]:
    """Every ``<site>.hybrid.pub`` in a directory: the aggregator's list of known sites."""
    keys = {}
    for path in sorted(Path(directory).glob(f"*{PUB_SUFFIX}")):
        site = path.name.removesuffix(PUB_SUFFIX)
        if _SITE_RE.match(site) and site != AGGREGATOR_KEY_NAME:
            keys[site] = load_public_key(path)
    return keys


# ---------------------------------------------------------------------------------- sign / verify


def payload_digest(payload: bytes) -> bytes:
    return hashlib.sha512(payload).digest()


def _message(domain: Domain, digest: bytes) -> bytes:
    return b"fedmq/" + domain.encode() + b"/v1\x00" + digest


def sign(key: SigningKey, domain: Domain, payload: bytes) -> bytes:
    """Both signatures over the same domain-separated message, as one msgpack map."""
    m = _message(domain, payload_digest(payload))
    return msgpack.packb({"alg": ALGORITHM, "ed25519": key.ed25519.sign(m), "ml-dsa-65": key.mldsa.sign(m)},
                         use_bin_type=True)


def _halves(signature: bytes) -> tuple[bytes | None, bytes | None]:
    if not signature:
        raise SignatureInvalid("unsigned (empty signature)")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise SignatureInvalid(f"signature of {len(signature)} bytes is larger than a hybrid signature")
    try:
        obj = msgpack.unpackb(bytes(signature), raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any decoding failure is one verdict: not a hybrid signature
        raise SignatureInvalid("signature is not a hybrid signature map") from None
    if not isinstance(obj, dict) or obj.get("alg") != ALGORITHM or set(obj) - {"alg", "ed25519", "ml-dsa-65"}:
        raise SignatureInvalid(f"signature is not an {ALGORITHM} signature")
    ed, ml = obj.get("ed25519"), obj.get("ml-dsa-65")
    return (ed if isinstance(ed, bytes) and ed else None), (ml if isinstance(ml, bytes) and ml else None)


def verify(key: VerifyKey, domain: Domain, payload: bytes, signature: bytes) -> bytes:
    """Raise ``SignatureInvalid`` naming the failed half unless both halves verify; returns the
    payload's SHA-512 digest."""
    ed, ml = _halves(signature)
    if ed is None and ml is None:
        raise SignatureInvalid("both the Ed25519 and the ML-DSA-65 signature are missing")
    if ml is None:
        raise SignatureInvalid("ML-DSA-65 signature missing (an Ed25519 signature alone is not accepted)")
    if ed is None:
        raise SignatureInvalid("Ed25519 signature missing (an ML-DSA-65 signature alone is not accepted)")
    digest = payload_digest(payload)
    m = _message(domain, digest)
    try:
        key.ed25519.verify(ed, m)
    except InvalidSignature:
        raise SignatureInvalid("Ed25519 signature does not verify") from None
    try:
        key.mldsa.verify(ml, m)
    except InvalidSignature:
        raise SignatureInvalid("ML-DSA-65 signature does not verify") from None
    return digest


# ---------------------------------------------------------------------------------- messages


def signing_payload(chunk: UpdateChunk | GlobalVersionChunk) -> bytes:
    return encode(chunk.model_copy(update={"signature": b""}))


def sign_chunk(chunk: UpdateChunk, key: SigningKey) -> UpdateChunk:
    return chunk.model_copy(update={"signature": sign(key, "update-chunk", signing_payload(chunk))})


def chunk_digest(chunk: UpdateChunk) -> bytes:
    """The digest a chunk's signature covers (what ``verify_chunk`` returns)."""
    return payload_digest(signing_payload(chunk))


def verify_chunk(chunk: UpdateChunk, pinned: dict[str, VerifyKey]) -> bytes:
    """Verify a site's chunk; returns its payload digest (reused by the audit log)."""
    key = pinned.get(chunk.site_id)
    if key is None:
        raise UnknownSite(f"no pinned public key for site {chunk.site_id!r}")
    try:
        return verify(key, "update-chunk", signing_payload(chunk), chunk.signature)
    except SignatureInvalid as exc:
        raise SignatureInvalid(f"{chunk.update_id} chunk {chunk.chunk_index}: {exc.detail}") from None


def sign_version(chunk: GlobalVersionChunk, key: SigningKey) -> GlobalVersionChunk:
    return chunk.model_copy(update={"signature": sign(key, "global-version", signing_payload(chunk))})


def verify_version(chunk: GlobalVersionChunk, key: VerifyKey) -> None:
    """Raise ``SignatureInvalid`` naming the version unless the aggregator signed this chunk."""
    try:
        verify(key, "global-version", signing_payload(chunk), chunk.signature)
    except SignatureInvalid as exc:
        raise SignatureInvalid(f"global version {chunk.version} ({chunk.mode}, chunk {chunk.chunk_index}): "
                               f"{exc.detail}") from None
