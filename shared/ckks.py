"""The HE seam: CKKS presets, key files, encrypt / load / fold / serialize / decrypt.

This is the only module that imports TenSEAL (its SEAL binding, ``tenseal.sealapi``); every
other module sees blocks of float64 values, opaque :class:`HeVector` handles and bytes, plus
``block_size`` and ``bytes_per_value``. Swapping the HE scheme means rewriting this module
and ``shared.ckks_wire`` (the byte format), nothing else.

Why the default format is what it is (``docs/crypto.md`` has the measurements):

* **Additions only.** The aggregator weights updates by small integers (a plaintext integer
  multiply, exact and scale-free), so a ciphertext never needs a spare modulus level, and one
  prime suffices: SEAL accepts a single-prime context with key switching off.
* **Symmetric, seeded.** Only key holders (the sites) encrypt, so a fresh ciphertext's second
  polynomial is the expansion of a 64-byte PRNG seed and travels as that seed.
* **Coefficient encoding.** Values are written onto the plaintext polynomial's coefficients
  (through the inverse of SEAL's slot embedding, one numpy FFT), N reals per ciphertext
  instead of N/2, and encoding noise lands on coefficients, which saves modulus bits.
* **Bit-packed.** ``shared.ckks_wire`` stores c0 at exactly the prime's bit length.

Security: N = 4096 with one 49-bit prime is far inside the HomomorphicEncryption.org
standard's 128-bit bound (109 bits for N = 4096); SEAL enforces the bound itself when the
context is built (``sec_level_type.tc128``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import tenseal.sealapi as seal

from fedmq.shared import ckks_wire as wire
from fedmq.shared.atomic import atomic_write_bytes
from fedmq.shared.errors import CryptoError, SecretKeyPresentError, WireError

PresetName = Literal["n4096-q49"]

#: Largest |sum| relative to the wrap point that ``decrypt_block`` accepts as surely unwrapped.
_WRAP_GUARD = 0.9
#: Fresh-encryption noise bound in coefficient units: SEAL clips its error distribution at
#: 6 sigma (sigma = 3.2).
FRESH_NOISE_BOUND = 19.2


@dataclass(frozen=True)
class CkksPreset:
    """One set of CKKS parameters plus the value bound the federation promises to respect."""

    name: str
    wire_id: int
    poly_modulus_degree: int
    prime_bits: int
    scale_bits: int
    #: largest |value| a site may encrypt (checked before encryption)
    value_bound: float

    @property
    def block_size(self) -> int:
        """Values per ciphertext: coefficient encoding puts one real on each of the N coefficients."""
        return self.poly_modulus_degree

    @property
    def modulus_bits(self) -> int:
        return self.prime_bits

    @property
    def headroom(self) -> float:
        """Largest |weighted sum| a folded ciphertext can hold before it wraps (q/2 / scale),
        less the noise allowance: the prime is just below 2^bits, hence the 0.999."""
        return 0.999 * 2.0 ** (self.prime_bits - 1 - self.scale_bits)

    @property
    def max_abs_value(self) -> float:
        return self.value_bound

    @property
    def fold_units_limit(self) -> int:
        """Most integer weight units one buffer may sum before |sum| could reach the headroom."""
        return int(self.headroom // self.value_bound)

    @property
    def seeded_bytes(self) -> int:
        """Wire size of one fresh (seeded) ciphertext, as a site sends it."""
        return _wire_params_shape(self).size(wire.KIND_SEEDED)

    @property
    def folded_bytes(self) -> int:
        """Wire size of one folded ciphertext (both polynomials), as a version carries it."""
        return _wire_params_shape(self).size(wire.KIND_FULL)

    @property
    def bytes_per_value(self) -> float:
        return self.seeded_bytes / self.block_size

    @property
    def error_bound(self) -> float:
        """Worst-case |error| per value of a decrypted weighted average, whatever the integer
        weights: a weighted average of errors is at most the largest one, the clipped fresh noise
        plus the encoding's rounding, over the scale. (float64 decoding adds < 1e-9 at the
        headroom; the tests and bench-crypto measure the total.)"""
        return (FRESH_NOISE_BOUND + 0.5) / 2.0**self.scale_bits


PRESETS: dict[str, CkksPreset] = {
    p.name: p
    for p in (
        # 49 bits = 1 sign + 23 bits of headroom (64 updates x weight 1000 x |x| 100 = 6.4e6 < 2^23)
        # + 25 bits of scale (fresh noise <= 19.2 / 2^25 = 5.7e-7 < the 1e-6 error budget)
        CkksPreset("n4096-q49", 1, 4096, 49, 25, 100.0),
    )
}
DEFAULT_PRESET: PresetName = "n4096-q49"
#: TenSEAL CKKSVector presets of key-file format 1; their key files are refused with advice.
RETIRED_PRESETS = ("n4096-q50", "n4096-q54", "n8192-q60", "n8192-q60-40-60")

#: Error budget we test against: the decrypted weighted average of 64 updates, integer weights
#: up to 1000, values in [-100, 100], differs from the float64 one by at most this, per value.
AGGREGATION_ERROR_BUDGET = 1e-6

SECRET_CONTEXT_FILE = "site-secret.ckks"
PUBLIC_CONTEXT_FILE = "aggregator-public.ckks"
FINGERPRINT_FILE = "fingerprint.txt"

_MAGIC = b"FEDMQHE2\n"
_OLD_MAGIC = b"FEDMQCKKS1\n"


def get_preset(name: str) -> CkksPreset:
    try:
        return PRESETS[name]
    except KeyError:
        if name in RETIRED_PRESETS:
            raise CryptoError(
                f"CKKS preset {name!r} is retired (TenSEAL CKKSVector format); use {DEFAULT_PRESET!r}"
            ) from None
        raise CryptoError(f"unknown CKKS preset {name!r}; choose one of {sorted(PRESETS)}") from None


# --------------------------------------------------------------------- scratch files

_scratch_lock = threading.Lock()
_scratch_dir: dict[int, str] = {}


def _scratch_path(tag: str) -> str:
    """A per-process, per-thread file path for sealapi, which saves and loads through paths.

    On tmpfs when the machine has one; the file is unlinked before each write (overwriting an
    existing file forces a flush, ~30x slower). Only ciphertexts and, for one instant while a
    key file is read, the secret key pass through here, in a 0700 directory."""
    pid = os.getpid()
    with _scratch_lock:
        d = _scratch_dir.get(pid)
        if d is None:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
            _sweep_scratch(base)
            d = tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{pid}-", dir=base)
            _scratch_dir[pid] = d
            atexit.register(shutil.rmtree, d, True)
    return os.path.join(d, f"{tag}-{threading.get_ident()}")


_SCRATCH_PREFIX = "fedmq-he-"


def _sweep_scratch(base: str) -> None:
    """Remove the scratch directories of this user's processes that are gone: a SIGKILLed
    aggregator or site leaves its last ciphertext on tmpfs, which is memory, and a service that
    restarts after crashes would otherwise collect them. A directory names its process's pid;
    a live pid (or one reused since) is left alone."""
    uid = os.getuid()
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not name.startswith(_SCRATCH_PREFIX):
            continue
        pid_text = name[len(_SCRATCH_PREFIX):].split("-", 1)[0]
        try:
            if not pid_text.isdigit() or entry.stat(follow_symlinks=False).st_uid != uid:
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (OSError, ValueError):  # alive under another user, or gone meanwhile
            continue


def _save(obj: object, tag: str) -> bytes:
    path = _scratch_path(tag)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    obj.save(path)  # type: ignore[attr-defined]
    try:
        fd = os.open(path, os.O_RDONLY)  # no Python file object: this runs once per ciphertext
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            while len(data) < size:  # a short read, in theory
                more = os.read(fd, size - len(data))
                if not more:
                    break
                data += more
            return data
        finally:
            os.close(fd)
    finally:
        if tag == "key":
            os.unlink(path)


def _load_into(obj: object, sctx: seal.SEALContext, data: bytes, tag: str) -> None:
    path = _scratch_path(tag)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    try:
        obj.load(sctx, path)  # type: ignore[attr-defined]
    finally:
        if tag == "key":  # key material never stays on disk; ciphertexts are unlinked by the next write
            os.unlink(path)


# --------------------------------------------------------------------- contexts and keys


def _seal_context(preset: CkksPreset) -> seal.SEALContext:
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(preset.poly_modulus_degree)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(preset.poly_modulus_degree, [preset.prime_bits]))
    sctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not sctx.parameters_set():
        raise CryptoError(f"SEAL refuses preset {preset.name}: {sctx.parameters_error_message()}")
    return sctx


_SEAL_VERSION: tuple[int, int] | None = None


def _seal_version() -> tuple[int, int]:
    """SEAL's serialization version, read from a header it writes (no other API exposes it)."""
    global _SEAL_VERSION
    if _SEAL_VERSION is None:
        head = _save(seal.Ciphertext(), "probe")
        _SEAL_VERSION = (head[3], head[4])
    return _SEAL_VERSION


def _wire_params(preset: CkksPreset, sctx: seal.SEALContext, key_id: bytes) -> wire.WireParams:
    q = sctx.first_context_data().parms().coeff_modulus()[0].value()
    return wire.WireParams(
        preset_id=preset.wire_id, key_id=key_id, n=preset.poly_modulus_degree, modulus=int(q),
        scale=float(2**preset.scale_bits), parms_id=tuple(sctx.first_parms_id()),  # type: ignore[arg-type]
        seal_version=_seal_version(),
    )


def _wire_params_shape(preset: CkksPreset) -> wire.WireParams:
    """Only the sizes: prime of exactly ``prime_bits`` bits."""
    return wire.WireParams(preset.wire_id, b"\0" * 8, preset.poly_modulus_degree, 2**preset.prime_bits - 1,
                           float(2**preset.scale_bits), (0, 0, 0, 0), (0, 0))


class _SlotMap:
    """SEAL's CKKS slot embedding for ring degree N, so values can sit on coefficients.

    SEAL's slot j holds the plaintext polynomial evaluated at w^(3^j mod 2N), w = e^(i pi / N)
    (its ``matrix_reps_index_map_``). ``to_slots`` evaluates the polynomial whose coefficients
    are the values there, so that SEAL's encoder rounds scale * value onto each coefficient;
    ``from_slots`` undoes it after decoding."""

    def __init__(self, n: int) -> None:
        m = 2 * n
        g = np.empty(n // 2, dtype=np.int64)
        p = 1
        for j in range(n // 2):
            g[j] = p
            p = p * 3 % m
        self.n = n
        self.index = (g - 1) // 2
        self.twist = np.exp(1j * np.pi * np.arange(n) / n)
        self.untwist = np.conj(self.twist) / n

    def to_slots(self, x: np.ndarray) -> np.ndarray:
        """Works on one block or on rows of blocks (the last axis), with identical results."""
        return self.n * np.fft.ifft(x * self.twist, axis=-1)[..., self.index]  # same values, half the multiplies

    def from_slots(self, z: np.ndarray) -> np.ndarray:
        full = np.zeros(self.n, dtype=np.complex128)
        full[self.index] = z
        full[self.n - 1 - self.index] = np.conj(z)
        return np.real(np.fft.fft(full) * self.untwist)


@dataclass(frozen=True)
class KeyFiles:
    secret_context: Path
    public_context: Path
    fingerprint: str


def init_keys(out_dir: str | Path, preset_name: str = DEFAULT_PRESET) -> KeyFiles:
    """Write the site secret key file and the aggregator's public one, refusing to overwrite."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = out / SECRET_CONTEXT_FILE, out / PUBLIC_CONTEXT_FILE
    for p in (secret_path, public_path):
        if p.exists():
            raise CryptoError(f"{p} exists; refusing to overwrite key material")
    preset = get_preset(preset_name)
    sctx = _seal_context(preset)
    secret = _save(seal.KeyGenerator(sctx).secret_key(), "key")
    # The key id differs for every generated key, even with equal parameters, and reveals
    # nothing about the secret (a hash of it, cut to 64 bits).
    nonce = hashlib.sha256(b"fedmq key id\0" + secret).hexdigest()[:16]
    fingerprint = f"{preset.name}:{nonce}"
    q = int(sctx.first_context_data().parms().coeff_modulus()[0].value())
    atomic_write_bytes(secret_path, _frame(fingerprint, preset, q, secret))
    secret_path.chmod(0o600)
    atomic_write_bytes(public_path, _frame(fingerprint, preset, q, b""))
    (out / FINGERPRINT_FILE).write_text(fingerprint + "\n")
    return KeyFiles(secret_path, public_path, fingerprint)


def _frame(fingerprint: str, preset: CkksPreset, modulus: int, secret: bytes) -> bytes:
    head = {"fingerprint": fingerprint, "preset": preset.name, "modulus": modulus,
            "n": preset.poly_modulus_degree, "scale_bits": preset.scale_bits, "secret": bool(secret)}
    return _MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + secret


def _unframe(path: Path) -> tuple[dict[str, object], bytes]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CryptoError(f"key file {path} not found (run `fedmq keys init`)") from None
    if data.startswith(_OLD_MAGIC):
        old = data[len(_OLD_MAGIC) :].partition(b"\n")[0].decode(errors="replace").split(":", 1)[0]
        raise CryptoError(
            f"{path} is a key file of the retired preset {old!r} (TenSEAL CKKSVector, key format 1); "
            f"fedmq now encrypts with {DEFAULT_PRESET!r}. Run `fedmq keys init --out DIR` for a new key, "
            f"give {SECRET_CONTEXT_FILE} to every site and {PUBLIC_CONTEXT_FILE} to the aggregator, and "
            f"start the federation from fresh state directories (old ciphertexts cannot be read)"
        )
    if not data.startswith(_MAGIC):
        raise CryptoError(f"{path} is not a fedmq CKKS key file")
    line, _, body = data[len(_MAGIC) :].partition(b"\n")
    try:
        head = json.loads(line)
    except ValueError:
        raise CryptoError(f"{path}: unreadable key file header") from None
    if not isinstance(head, dict):
        raise CryptoError(f"{path}: unreadable key file header")
    return head, body


@dataclass
class LoadedContext:
    """A loaded key: parameters, and the secret key on sites only. Opaque to callers."""

    fingerprint: str
    preset: CkksPreset
    _sctx: seal.SEALContext = field(repr=False)
    _wire: wire.WireParams = field(repr=False)
    _secret: seal.SecretKey | None = field(default=None, repr=False)
    #: the key file it came from (worker processes load their own copy from it)
    source: Path | None = None

    def __post_init__(self) -> None:
        self._encoder = seal.CKKSEncoder(self._sctx)
        self._evaluator = seal.Evaluator(self._sctx)
        self._slots = _SlotMap(self.preset.poly_modulus_degree)
        self._scale = float(2**self.preset.scale_bits)
        self._int_plains: dict[int, seal.Plaintext] = {}
        self._encryptor = seal.Encryptor(self._sctx, self._secret) if self._secret is not None else None
        self._decryptor = seal.Decryptor(self._sctx, self._secret) if self._secret is not None else None

    @property
    def is_private(self) -> bool:
        return self._secret is not None

    @property
    def block_size(self) -> int:
        return self.preset.block_size

    @property
    def bytes_per_value(self) -> float:
        return self.preset.bytes_per_value

    def _int_plain(self, k: int) -> seal.Plaintext:
        pt = self._int_plains.get(k)
        if pt is None:
            pt = seal.Plaintext()
            self._encoder.encode(int(k), 1.0, pt)  # the constant polynomial k, at scale 1
            if len(self._int_plains) < 4096:
                self._int_plains[k] = pt
        return pt


def load_context(path: str | Path, *, require_secret: bool | None = None) -> LoadedContext:
    """Load a key file; ``require_secret=False`` refuses any file that holds a secret key."""
    path = Path(path)
    head, body = _unframe(path)
    fingerprint = str(head.get("fingerprint", ""))
    preset_name = str(head.get("preset", ""))
    try:
        preset = get_preset(preset_name)
    except CryptoError as exc:
        raise CryptoError(f"{path}: {exc}") from None
    if fingerprint.split(":", 1)[0] != preset.name or len(fingerprint.split(":", 1)[-1]) != 16:
        raise CryptoError(f"{path}: fingerprint {fingerprint!r} does not belong to preset {preset.name}")
    sctx = _seal_context(preset)
    q = int(sctx.first_context_data().parms().coeff_modulus()[0].value())
    if head.get("modulus") != q or head.get("n") != preset.poly_modulus_degree or head.get("scale_bits") != preset.scale_bits:
        raise CryptoError(f"{path}: parameters differ from preset {preset.name} (modulus, N or scale)")
    has_secret = bool(body)
    if require_secret is False and has_secret:
        raise SecretKeyPresentError(f"{path} holds a CKKS secret key; the aggregator must never load one")
    if require_secret is True and not has_secret:
        raise CryptoError(f"{path} holds no secret key; sites need {SECRET_CONTEXT_FILE}")
    secret = None
    if has_secret:
        secret = seal.SecretKey()
        try:
            _load_into(secret, sctx, body, "key")
        except (ValueError, RuntimeError) as exc:
            raise CryptoError(f"{path}: unreadable secret key ({exc})") from None
    key_id = bytes.fromhex(fingerprint.split(":", 1)[1])
    return LoadedContext(fingerprint, preset, sctx, _wire_params(preset, sctx, key_id), secret, path.resolve())


# --------------------------------------------------------------------- blocks


class HeVector:
    """One ciphertext block held in memory (a SEAL ciphertext at the key's only level)."""

    __slots__ = ("_ct", "_ctx")

    def __init__(self, ctx: LoadedContext, ct: seal.Ciphertext) -> None:
        self._ctx = ctx
        self._ct = ct


def pad_block(values: np.ndarray, block_size: int) -> np.ndarray:
    if values.size > block_size:
        raise ValueError(f"block of {values.size} values exceeds {block_size} slots")
    out = np.zeros(block_size, dtype=np.float64)
    out[: values.size] = values
    return out


#: blocks whose slot values are computed in one numpy FFT call (a few MB: stays in cache)
_FFT_ROWS = 16


def encrypt_blocks(ctx: LoadedContext, blocks: np.ndarray) -> np.ndarray:
    """Rows of ``blocks`` ((k, <= block_size), |x| <= the preset's value bound) -> their wire
    bytes, one (k, ``seeded_bytes``) uint8 row each.

    The batch form of ``encrypt_block``, with the same bytes for the same values and seeds:
    the range check, the slot FFT and the bit-packing run over many blocks per numpy call,
    leaving SEAL's encode, encrypt and save as the only per-block work."""
    if ctx._encryptor is None:
        raise CryptoError("encryption needs the site's secret context")
    blocks = np.asarray(blocks, dtype=np.float64)
    if blocks.ndim != 2 or blocks.shape[1] > ctx.block_size:
        raise ValueError(f"blocks of shape {blocks.shape}; expected (k, <= {ctx.block_size})")
    # written as "not <=" so that NaN (which compares false to everything) is refused too
    if blocks.size and not float(np.max(np.abs(blocks))) <= ctx.preset.value_bound:
        raise CryptoError(f"value not finite or beyond the preset's range ({ctx.preset.value_bound:g})")
    if blocks.shape[1] < ctx.block_size:
        blocks = np.pad(blocks, ((0, 0), (0, ctx.block_size - blocks.shape[1])))
    encoder, encryptor, scale = ctx._encoder, ctx._encryptor, ctx._scale
    streams: list[bytes] = []
    for start in range(0, len(blocks), _FFT_ROWS):
        for slots in ctx._slots.to_slots(blocks[start : start + _FFT_ROWS]):
            plain = seal.Plaintext()
            encoder.encode(slots.tolist(), scale, plain)
            streams.append(_save(encryptor.encrypt_symmetric(plain), "ct"))
    return wire.seeded_streams_to_wire(streams, ctx._wire)


def encrypt_block(ctx: LoadedContext, values: np.ndarray) -> bytes:
    """One block (at most ``block_size`` values, |x| <= the preset's value bound) -> wire bytes."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size > ctx.block_size:
        raise ValueError(f"block of {values.size} values exceeds {ctx.block_size} slots")
    return encrypt_blocks(ctx, values[None, :])[0].tobytes()


def check_ciphertext(ctx: LoadedContext, data: bytes) -> None:
    """Everything about a ciphertext's bytes that can be checked cheaply, without SEAL: size,
    format, parameters, seed length, checksum, key id. Raises a ``WireError`` whose reason names
    the fault."""
    wire.check_wire(data, ctx._wire)


def load_ciphertext(ctx: LoadedContext, data: bytes, *, checked: bool = False) -> HeVector:
    """Wire bytes -> a ciphertext to fold or decrypt; each fault raises its own ``WireError``.

    ``checked``: ``check_ciphertext`` already passed on these very bytes (kept in memory or a
    CRC-framed log since), so their checksum is not hashed again; every other check still runs."""
    stream = wire.wire_to_seal(bytes(data), ctx._wire, checksum=not checked)
    ct = seal.Ciphertext()
    try:
        _load_into(ct, ctx._sctx, stream, "ct")
    except (ValueError, RuntimeError) as exc:
        raise wire.CiphertextMalformed(f"SEAL refuses the ciphertext ({exc})") from None
    return HeVector(ctx, ct)


def serialize(vec: HeVector) -> bytes:
    """A folded (or fresh) ciphertext -> wire bytes."""
    return wire.seal_to_wire(_save(vec._ct, "ct"), vec._ctx._wire)


def save_for_add(vec: HeVector) -> bytes:
    """``vec`` as SEAL saves it: what ``add_to_wire`` adds onto a block's wire bytes, in this
    process or in a commit worker (``ckks_pool.AddPool``, which never loads SEAL)."""
    return _save(vec._ct, "ct")


def add_to_wire(ctx: LoadedContext, data: bytes | None, saved: bytes) -> bytes:
    """The wire bytes of ``data`` (full-kind bytes this process made or checked; None: zero)
    plus the ciphertext ``save_for_add`` gave; ``ckks_wire.add_full`` says why this equals
    SEAL's own addition, word for word."""
    return wire.add_full(data, saved, ctx._wire)


def wire_params(ctx: LoadedContext) -> wire.WireParams:
    """What the key's parameters imply about every ciphertext (a commit worker needs no more)."""
    return ctx._wire


def decrypt_block(ctx: LoadedContext, data: bytes | HeVector) -> np.ndarray:
    """A full block of ``block_size`` values (sums of weighted values, for folded blocks)."""
    if ctx._decryptor is None:
        raise CryptoError("decryption needs the site's secret context")
    vec = load_ciphertext(ctx, data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    plain = seal.Plaintext()
    ctx._decryptor.decrypt(vec._ct, plain)
    values = ctx._slots.from_slots(np.asarray(ctx._encoder.decode_complex(plain), dtype=np.complex128))
    if values.size and float(np.max(np.abs(values))) >= _WRAP_GUARD * ctx.preset.headroom:
        raise CryptoError(
            f"decrypted |value| {float(np.max(np.abs(values))):.3g} is at the edge of preset "
            f"{ctx.preset.name}'s headroom ({ctx.preset.headroom:.3g}): the sum may have wrapped"
        )
    return values


# --------------------------------------------------------------------- folding (no secret needed)


def scale_by_int(vec: HeVector, factor: int) -> HeVector:
    """factor * vec, exactly (a plaintext integer multiply: no scale change, no level).

    Returns ``vec`` itself for factor 1; callers that add in place must own it."""
    if factor < 1:
        raise ValueError("integer weight must be >= 1")
    if factor == 1:
        return vec
    ctx = vec._ctx
    out = seal.Ciphertext()
    ctx._evaluator.multiply_plain(vec._ct, ctx._int_plain(factor), out)
    return HeVector(ctx, out)


def add_inplace(target: HeVector, other: HeVector) -> HeVector:
    """target += other; returns target."""
    target._ctx._evaluator.add_inplace(target._ct, other._ct)
    return target


def accumulate(target: HeVector | None, vec: HeVector, factor: int) -> HeVector:
    """target + factor * vec; ``vec`` must be owned by the caller (it may become the result)."""
    scaled = scale_by_int(vec, factor)
    if target is None:
        return scaled
    return add_inplace(target, scaled)


def sum_vectors(vectors: Sequence[HeVector]) -> HeVector:
    """A new vector; the inputs are left untouched."""
    ctx = vectors[0]._ctx
    out = seal.Ciphertext()
    if len(vectors) == 1:
        ctx._evaluator.multiply_plain(vectors[0]._ct, ctx._int_plain(1), out)
    else:
        ctx._evaluator.add(vectors[0]._ct, vectors[1]._ct, out)
        for v in vectors[2:]:
            ctx._evaluator.add_inplace(out, v._ct)
    return HeVector(ctx, out)


__all__ = [
    "add_to_wire",
    "save_for_add",
    "wire_params",
    "AGGREGATION_ERROR_BUDGET", "DEFAULT_PRESET", "PRESETS", "PUBLIC_CONTEXT_FILE", "SECRET_CONTEXT_FILE",
    "CkksPreset", "HeVector", "KeyFiles", "LoadedContext", "WireError", "accumulate", "add_inplace",
    "check_ciphertext", "decrypt_block", "encrypt_block", "encrypt_blocks", "get_preset", "init_keys",
    "load_ciphertext", "load_context", "pad_block", "scale_by_int", "serialize", "sum_vectors",
]
