"""CKKS parameters, key files and block encryption: the one place that knows TenSEAL.

Our homomorphic workload is additions only: the aggregator weights updates by small
integers (double-and-add, see ``aggregator.fold``) instead of plaintext multiplies, so a
ciphertext never needs a spare modulus level. Every preset therefore has exactly one data
prime plus the special prime TenSEAL requires, and a ciphertext already sits at the last
modulus when it is encrypted: about 29-32 bytes per value on the wire instead of ~57 for
the usual ``[60, 40, 40, 60]``-style chains. ``docs/crypto.md`` holds the measurements.

Security: every preset's total modulus stays within the HomomorphicEncryption.org
standard's 128-bit bound for its ring dimension (N=4096: 109 bits, N=8192: 218 bits),
which SEAL enforces itself when the context is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tenseal as ts

from shared.atomic import atomic_write_bytes
from shared.errors import CryptoError, SecretKeyPresentError

PresetName = Literal["n4096-q50", "n4096-q54", "n8192-q60", "n8192-q60-40-60"]


@dataclass(frozen=True)
class CkksPreset:
    name: str
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    #: largest |value| a folded ciphertext may hold: data prime / scale, with a 2x margin.
    max_abs_value: float

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def _preset(name: str, n: int, coeffs: tuple[int, ...], scale_bits: int) -> CkksPreset:
    return CkksPreset(name, n, coeffs, scale_bits, float(2 ** (coeffs[0] - scale_bits - 2)))


PRESETS: dict[str, CkksPreset] = {
    p.name: p
    for p in (
        _preset("n4096-q50", 4096, (50, 50), 32),
        _preset("n4096-q54", 4096, (54, 54), 36),
        _preset("n8192-q60", 8192, (60, 60), 40),
        # The common textbook chain with one multiplicative level, kept as the baseline the
        # benchmark compares against; fedmq itself never needs the extra level.
        _preset("n8192-q60-40-60", 8192, (60, 40, 60), 40),
    )
}
DEFAULT_PRESET: PresetName = "n4096-q54"

#: Error budget we test against: the decrypted weighted average of updates whose values
#: lie in [-1, 1] differs from the float64 plaintext one by at most this, per value.
AGGREGATION_ERROR_BUDGET = 1e-6

SECRET_CONTEXT_FILE = "site-secret.ckks"
PUBLIC_CONTEXT_FILE = "aggregator-public.ckks"
FINGERPRINT_FILE = "fingerprint.txt"


def get_preset(name: str) -> CkksPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise CryptoError(f"unknown CKKS preset {name!r}; choose one of {sorted(PRESETS)}") from None


def new_secret_context(preset: CkksPreset) -> ts.Context:
    """A fresh key: symmetric encryption, since only key holders (sites) ever encrypt."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        preset.poly_modulus_degree,
        coeff_mod_bit_sizes=list(preset.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.global_scale = float(2**preset.scale_bits)
    return ctx


def serialize_public(ctx: ts.Context) -> bytes:
    """The evaluation context: parameters only, no secret, public, Galois or relin keys."""
    return ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )


def context_fingerprint(ctx: ts.Context) -> str:
    """Identifies the key: hash of the public parameters plus a hash bound to the secret.

    The public file carries the fingerprint it was made with (next to it on disk and in
    every message), so the aggregator can check a message's key id without the secret.
    """
    return hashlib.sha256(serialize_public(ctx)).hexdigest()[:32]


@dataclass(frozen=True)
class KeyFiles:
    secret_context: Path
    public_context: Path
    fingerprint: str


def init_keys(out_dir: str | Path, preset_name: str = DEFAULT_PRESET) -> KeyFiles:
    """Write the site secret context and the aggregator's public one, refusing to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out / SECRET_CONTEXT_FILE, out / PUBLIC_CONTEXT_FILE
    for p in (secret_path, public_path):
        if p.exists():
            raise CryptoError(f"{p} exists; refusing to overwrite key material")
    preset = get_preset(preset_name)
    ctx = new_secret_context(preset)
    # A key id that differs for every generated key, even with equal parameters.
    nonce = hashlib.sha256(ctx.serialize(save_secret_key=True)).hexdigest()[:16]
    fingerprint = f"{preset.name}:{nonce}"
    atomic_write_bytes(secret_path, _frame(fingerprint, ctx.serialize(save_secret_key=True)))
    secret_path.chmod(0o600)
    atomic_write_bytes(public_path, _frame(fingerprint, serialize_public(ctx)))
    (out / FINGERPRINT_FILE).write_text(fingerprint + "\n")
    return KeyFiles(secret_path, public_path, fingerprint)


_MAGIC = b"FEDMQCKKS1\n"


def _frame(fingerprint: str, body: bytes) -> bytes:
    return _MAGIC + fingerprint.encode() + b"\n" + body


def _unframe(path: Path) -> tuple[str, bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CryptoError(f"key file {path} not found (run `fedmq keys init`)") from None
    if not data.startswith(_MAGIC):
        raise CryptoError(f"{path} is not a fedmq CKKS key file")
    rest = data[len(_MAGIC) :]
    fp, _, body = rest.partition(b"\n")
    return fp.decode(), body


@dataclass
class LoadedContext:
    context: ts.Context
    fingerprint: str
    preset: CkksPreset

    @property
    def is_private(self) -> bool:
        return bool(self.context.has_secret_key())


def load_context(path: str | Path, *, require_secret: bool | None = None) -> LoadedContext:
    """Load a key file; ``require_secret=False`` refuses any file that holds a secret key."""
    fingerprint, body = _unframe(Path(path))
    preset = get_preset(fingerprint.split(":", 1)[0])
    try:
        ctx = ts.context_from(body)
    except Exception as exc:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise CryptoError(f"{path}: unreadable CKKS context ({exc})") from None
    has_secret = bool(ctx.has_secret_key())
    if require_secret is False and has_secret:
        raise SecretKeyPresentError(f"{path} holds a CKKS secret key; the aggregator must never load one")
    if require_secret is True and not has_secret:
        raise CryptoError(f"{path} holds no secret key; sites need {SECRET_CONTEXT_FILE}")
    ctx.global_scale = float(2**preset.scale_bits)
    return LoadedContext(ctx, fingerprint, preset)


def pad_block(values: np.ndarray, slots: int) -> np.ndarray:
    if values.size > slots:
        raise ValueError(f"block of {values.size} values exceeds {slots} slots")
    out = np.zeros(slots, dtype=np.float64)
    out[: values.size] = values
    return out


def encrypt_block(ctx: LoadedContext, values: np.ndarray) -> bytes:
    if not ctx.is_private:
        raise CryptoError("encryption needs the site's secret context")
    # written as "not <=" so that NaN (which compares false to everything) is refused too
    if values.size and not float(np.max(np.abs(values))) <= ctx.preset.max_abs_value:
        raise CryptoError(f"value not finite or beyond the preset's range ({ctx.preset.max_abs_value:g})")
    return ts.ckks_vector(ctx.context, pad_block(values, ctx.preset.slots)).serialize()


def encrypt_blocks(ctx: LoadedContext, blocks: Iterable[np.ndarray]) -> list[bytes]:
    return [encrypt_block(ctx, b) for b in blocks]


def load_ciphertext(ctx: LoadedContext, data: bytes) -> ts.CKKSVector:
    try:
        vec = ts.ckks_vector_from(ctx.context, data)
    except Exception as exc:
        raise CryptoError(f"unreadable ciphertext ({exc})") from None
    # TenSEAL parses many garbage byte strings (b"", b"xxx") as an empty vector; every
    # ciphertext fedmq makes is one full, padded block.
    if vec.size() != ctx.preset.slots:
        raise CryptoError(f"ciphertext holds {vec.size()} values, expected a full block of {ctx.preset.slots}")
    return vec


def decrypt_block(ctx: LoadedContext, data: bytes | ts.CKKSVector) -> np.ndarray:
    if not ctx.is_private:
        raise CryptoError("decryption needs the site's secret context")
    vec = load_ciphertext(ctx, data) if isinstance(data, bytes) else vec_with_context(ctx, data)
    return np.asarray(vec.decrypt(), dtype=np.float64)


def vec_with_context(ctx: LoadedContext, vec: ts.CKKSVector) -> ts.CKKSVector:
    vec.link_context(ctx.context)
    return vec


def scale_by_int(vec: ts.CKKSVector, factor: int) -> ts.CKKSVector:
    """factor * vec by double-and-add: integer weights cost additions, never a level.

    Returns ``vec`` itself for factor 1; callers that add in place must own it.
    """
    if factor < 1:
        raise ValueError("integer weight must be >= 1")
    result: ts.CKKSVector | None = None
    addend = vec
    while True:
        if factor & 1:
            result = addend if result is None else result + addend
        factor >>= 1
        if not factor:
            break
        addend = addend + addend
    assert result is not None
    return result


def sum_vectors(vectors: Sequence[ts.CKKSVector]) -> ts.CKKSVector:
    """A new vector; the inputs are left untouched (TenSEAL's copy() needs the secret key)."""
    total = vectors[0]
    for v in vectors[1:]:
        total = total + v
    return total
