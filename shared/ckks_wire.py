"""fedmq's ciphertext byte format ("HE1"): SEAL's seeded CKKS ciphertext, bit-packed.

SEAL saves a ciphertext as a zstd-compressed stream that carries its parameters id, scale and
every coefficient as a 64-bit word; a seeded (symmetric, fresh) ciphertext replaces its second
polynomial by the 64-byte PRNG seed it was drawn from. zstd leaves the 49-bit coefficients of
the default preset at about 57 bits each. This module stores exactly what is not implied by
the key's parameters:

    offset  size  field
    0       2     magic b"\\xfeH"
    2       1     format version (1)
    3       1     preset id (``CkksPreset.wire_id``): parameters the ciphertext was made for
    4       1     kind: 0 = seeded (c0 + seed), 1 = full (c0 and c1)
    5       8     key id: the first 8 bytes of the key's nonce (another key is refused)
    13      4     BLAKE2b-32 of every other byte (corruption and bit flips are refused)
    17      1     seed length (64), seeded kind only
    18      1     SEAL PRNG type, seeded kind only
    19      64    PRNG seed, seeded kind only
    ...           each polynomial: N coefficients, low 48 bits as 6 bytes LE, then the top bit
                  packed 8 per byte (49 bits a coefficient for a 49-bit prime)

and rebuilds SEAL's own (uncompressed) stream from it for ``Ciphertext.load``. The layout of
SEAL's stream is checked against a real save in tests/unit/test_ckks.py, so a SEAL upgrade
that moves a field fails there instead of on the wire.

Nothing here imports TenSEAL; ``shared.ckks`` is the seam that does.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zstandard

from fedmq.shared.errors import CryptoError, WireError

MAGIC = b"\xfeH"
FORMAT_VERSION = 1
KIND_SEEDED = 0
KIND_FULL = 1
KEY_ID_BYTES = 8
SEED_BYTES = 64
_HEAD = struct.Struct("<2sBBB8s4s")  # magic, version, preset id, kind, key id, checksum
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compr mode, reserved, size
_SEAL_MAGIC = 0xA15E
_COMPR_NONE, _COMPR_ZSTD = 0, 2
#: a packed coefficient's low 48 bits, and the same fields within SEAL's 64-bit word
_LOW48 = np.dtype({"names": ["lo", "mid"], "formats": ["<u4", "<u2"], "offsets": [0, 4], "itemsize": 6})
_WORD_PARTS = np.dtype({"names": ["lo", "mid"], "formats": ["<u4", "<u2"], "offsets": [0, 4], "itemsize": 8})


class CiphertextError(WireError, CryptoError):
    """A ciphertext that must be refused; ``reason`` is its dead-letter reason."""

    reason = "ciphertext"


class CiphertextMalformed(CiphertextError):
    reason = "ciphertext-malformed"


class CiphertextTruncated(CiphertextError):
    reason = "ciphertext-truncated"


class CiphertextCorrupt(CiphertextError):
    reason = "ciphertext-corrupt"


class CiphertextSeedLength(CiphertextError):
    reason = "ciphertext-seed"


class CiphertextParameters(CiphertextError):
    reason = "ciphertext-params"


class CiphertextWrongKey(CiphertextError):
    reason = "ciphertext-key"


@dataclass(frozen=True)
class WireParams:
    """What a key's parameters imply about every ciphertext, so the wire need not carry it."""

    preset_id: int
    key_id: bytes
    n: int
    modulus: int
    scale: float
    parms_id: tuple[int, int, int, int]
    seal_version: tuple[int, int]

    @property
    def bits(self) -> int:
        return self.modulus.bit_length()

    def poly_bytes(self) -> int:
        return self.n * 6 + (self.n * (self.bits - 48) + 7) // 8

    def size(self, kind: int) -> int:
        seeded = 2 + SEED_BYTES if kind == KIND_SEEDED else 0
        polys = 1 if kind == KIND_SEEDED else 2
        return _HEAD.size + seeded + polys * self.poly_bytes()


def _checksum(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=4)
    for part in parts:
        h.update(part)
    return h.digest()


def _pack_poly(coeffs: np.ndarray, bits: int) -> bytes:
    """Coefficients < 2^bits (48 < bits <= 56) as 6 low bytes each, then the high bits packed."""
    as_bytes = coeffs.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    low = as_bytes[:, :6].tobytes()
    high_bits = bits - 48
    high = as_bytes[:, 6]
    if high_bits == 1:
        packed_high = np.packbits(high & 1, bitorder="little").tobytes()
    else:
        bit_planes = np.unpackbits(high[:, None], axis=1, bitorder="little")[:, :high_bits]
        packed_high = np.packbits(bit_planes.reshape(-1), bitorder="little").tobytes()
    return low + packed_high


def _unpack_poly(data: memoryview, n: int, bits: int) -> np.ndarray:
    low = np.frombuffer(data[: 6 * n], dtype=np.uint8).reshape(n, 6)
    words = np.zeros((n, 8), dtype=np.uint8)
    words[:, :6] = low
    high_bits = bits - 48
    raw_high = np.frombuffer(data[6 * n :], dtype=np.uint8)
    if high_bits == 1:
        words[:, 6] = np.unpackbits(raw_high, bitorder="little")[:n]
    else:
        planes = np.unpackbits(raw_high, bitorder="little")[: n * high_bits].reshape(n, high_bits)
        words[:, 6] = np.packbits(planes, axis=1, bitorder="little")[:, 0]
    return words.view("<u8").reshape(n)


# --------------------------------------------------------------------- SEAL's stream


def _parse_seal(seal_file_bytes: bytes, params: WireParams) -> tuple[int, list[np.ndarray], bytes]:
    """A ciphertext as SEAL saved it (header + zstd or raw stream) -> (kind, its polynomials,
    the seed fields of a seeded one); every field is checked against the key's parameters."""
    magic, hsize, _major, _minor, compr, _res, size = _SEAL_HEADER.unpack_from(seal_file_bytes)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or size != len(seal_file_bytes):
        raise CryptoError("SEAL wrote a stream this module does not understand (header)")
    payload = seal_file_bytes[_SEAL_HEADER.size :]
    if compr == _COMPR_ZSTD:
        body = _decompressor().decompress(payload, max_output_size=64 + 16 * params.n * 2 + 256)
    elif compr == _COMPR_NONE:
        body = payload
    else:
        raise CryptoError(f"SEAL stream compressed with mode {compr}; expected zstd or none")
    mv = memoryview(body)
    prefix = _prefix(params, size=2)
    if bytes(mv[: len(prefix)]) != prefix:
        raise CryptoError("SEAL ciphertext stream does not match the key's parameters (prefix)")
    off = len(prefix)
    _m, _h, _a, _b, _c, _r, arr_size = _SEAL_HEADER.unpack_from(mv, off)
    (count,) = struct.unpack_from("<Q", mv, off + _SEAL_HEADER.size)
    off += _SEAL_HEADER.size + 8
    coeffs = np.frombuffer(mv[off : off + 8 * count], dtype="<u8")
    off += 8 * count
    if count == params.n:
        kind, polys = KIND_SEEDED, [coeffs]
        seed_header = _SEAL_HEADER.unpack_from(mv, off)
        if seed_header[6] != _SEAL_HEADER.size + 1 + SEED_BYTES:
            raise CryptoError("SEAL seed block of unexpected size")
        prng_type = mv[off + _SEAL_HEADER.size]
        seed = bytes(mv[off + _SEAL_HEADER.size + 1 : off + _SEAL_HEADER.size + 1 + SEED_BYTES])
        extra = bytes([SEED_BYTES, prng_type]) + seed
        off += _SEAL_HEADER.size + 1 + SEED_BYTES
    elif count == 2 * params.n:
        kind, polys, extra = KIND_FULL, [coeffs[: params.n], coeffs[params.n :]], b""
    else:
        raise CryptoError(f"SEAL ciphertext with {count} coefficients; expected {params.n} or {2 * params.n}")
    if off != len(body):
        raise CryptoError("SEAL ciphertext stream has trailing bytes")
    return kind, polys, extra


def _to_wire(kind: int, polys: Sequence[np.ndarray], extra: bytes, params: WireParams) -> bytes:
    rest = extra + b"".join(_pack_poly(p, params.bits) for p in polys)
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, params.preset_id, kind, params.key_id, b"\0\0\0\0")
    checksum = _checksum(head[:13], rest)
    return head[:13] + checksum + rest


def seal_to_wire(seal_file_bytes: bytes, params: WireParams) -> bytes:
    """A ciphertext as SEAL saved it (header + zstd stream) -> fedmq's packed bytes."""
    return _to_wire(*_parse_seal(seal_file_bytes, params), params)


def add_full(data: bytes | None, seal_file_bytes: bytes, params: WireParams) -> bytes:
    """``data`` (full-kind wire bytes this process made or checked, or None for zero) plus a
    full ciphertext as SEAL saved it -> the wire bytes of their sum, with numpy only.

    Adding two CKKS ciphertexts at the same level and scale is adding their polynomials
    coefficient by coefficient modulo the prime (SEAL's ``add_inplace`` does exactly that, in
    the NTT form both are in). ``_parse_seal`` checks the other's parameters id, NTT form and
    scale against the key's, and the wire format implies the same for ``data``, so the sum is
    the one SEAL computes, word for word (tests/unit/test_ckks.py compares them). Needing no
    SEAL, it runs in the aggregator's commit workers (``shared.ckks_pool``), which take this
    half of a commit off the engine's core."""
    kind, other, extra = _parse_seal(seal_file_bytes, params)
    if data is None:
        return _to_wire(kind, other, extra, params)
    if kind != KIND_FULL or check_wire(data, params, checksum=False) != KIND_FULL:
        raise CryptoError("add_full adds full ciphertexts, not seeded ones")
    n, bits, pb = params.n, params.bits, params.poly_bytes()
    mv = memoryview(data)[_HEAD.size :]
    q = np.uint64(params.modulus)
    out = []
    for i in range(2):
        if int(other[i].max()) >= params.modulus:
            raise CryptoError("SEAL ciphertext coefficient not reduced modulo the prime")
        total = _unpack_poly(mv[i * pb : (i + 1) * pb], n, bits) + other[i]  # < 2q < 2^64
        np.subtract(total, q, out=total, where=total >= q)
        out.append(total)
    return _to_wire(KIND_FULL, out, b"", params)


_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """One zstd decompression context per thread (a context is not thread-safe)."""
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d


def params_to_json(params: WireParams) -> str:
    """The parameters as JSON, for a worker process that needs no key (``shared.ckks_pool``)."""
    return json.dumps({"preset_id": params.preset_id, "key_id": params.key_id.hex(), "n": params.n,
                       "modulus": params.modulus, "scale": params.scale, "parms_id": list(params.parms_id),
                       "seal_version": list(params.seal_version)})


def params_from_json(text: str) -> WireParams:
    d = json.loads(text)
    return WireParams(preset_id=int(d["preset_id"]), key_id=bytes.fromhex(d["key_id"]), n=int(d["n"]),
                      modulus=int(d["modulus"]), scale=float(d["scale"]), parms_id=tuple(d["parms_id"]),
                      seal_version=tuple(d["seal_version"]))


def seeded_streams_to_wire(streams: Sequence[bytes], params: WireParams) -> np.ndarray:
    """Many fresh (seeded) ciphertexts as SEAL saved them -> their wire bytes, one row each.

    The same bytes as ``seal_to_wire`` on each stream (tests/unit/test_ckks.py checks it), but
    parsed and bit-packed as one numpy array: a site encrypting a ResNet-50 update packs ~6,000
    ciphertexts, and per-ciphertext numpy calls were a tenth of its encryption time. A stream
    whose layout differs from the one expected goes through ``seal_to_wire`` on its own, so
    every stream gets exactly that function's checks and errors."""
    rows = np.empty((len(streams), params.size(KIND_SEEDED)), dtype=np.uint8)
    if not streams:
        return rows
    n, bits = params.n, params.bits
    prefix = _prefix(params, size=2)
    p = len(prefix)
    seed_at = p + _SEAL_HEADER.size + 8 + 8 * n
    body_len = seed_at + _SEAL_HEADER.size + 1 + SEED_BYTES
    dctx = zstandard.ZstdDecompressor()
    bodies: list[bytes] = []
    odd: list[int] = []
    for i, data in enumerate(streams):
        magic, hsize, _major, _minor, compr, _res, size = _SEAL_HEADER.unpack_from(data)
        if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or size != len(data) or compr != _COMPR_ZSTD:
            odd.append(i)
            continue
        body = dctx.decompress(memoryview(data)[_SEAL_HEADER.size :], max_output_size=body_len + 1)
        if len(body) != body_len:
            odd.append(i)
            continue
        bodies.append(body)
    good = np.setdiff1d(np.arange(len(streams)), np.asarray(odd, dtype=np.int64))
    if good.size:
        arr = np.frombuffer(b"".join(bodies), dtype=np.uint8).reshape(good.size, body_len)
        count = arr[:, p + _SEAL_HEADER.size : p + _SEAL_HEADER.size + 8].copy().view("<u8")[:, 0]
        seed_size = arr[:, seed_at + 8 : seed_at + 16].copy().view("<u8")[:, 0]
        ok = ((arr[:, :p] == np.frombuffer(prefix, dtype=np.uint8)).all(axis=1)
              & (count == n) & (seed_size == _SEAL_HEADER.size + 1 + SEED_BYTES))
        if not ok.all():  # let seal_to_wire name the fault
            odd += [int(i) for i in good[~ok]]
            arr, good = arr[ok], good[ok]
        coeffs = arr[:, p + _SEAL_HEADER.size + 8 : seed_at].reshape(good.size, n, 8)
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, params.preset_id, KIND_SEEDED, params.key_id, b"\0\0\0\0")[:13]
        out = rows if good.size == len(streams) else np.empty((good.size, rows.shape[1]), dtype=np.uint8)
        out[:, :13] = np.frombuffer(head, dtype=np.uint8)
        at = _HEAD.size
        out[:, at] = SEED_BYTES
        out[:, at + 1] = arr[:, seed_at + _SEAL_HEADER.size]
        out[:, at + 2 : at + 2 + SEED_BYTES] = arr[:, seed_at + _SEAL_HEADER.size + 1 :]
        at += 2 + SEED_BYTES
        # the low 6 bytes of each 8-byte word, copied as a 4-byte and a 2-byte field (numpy
        # copies whole fields much faster than single bytes)
        low = out[:, at : at + 6 * n].view(_LOW48)
        words = coeffs.view(_WORD_PARTS)[:, :, 0]
        low["lo"] = words["lo"]
        low["mid"] = words["mid"]
        at += 6 * n
        high_bits = bits - 48
        if high_bits == 1:
            packed = np.packbits(coeffs[:, :, 6] & 1, axis=1, bitorder="little")
        else:
            planes = np.unpackbits(coeffs[:, :, 6:7], axis=2, bitorder="little")[:, :, :high_bits]
            packed = np.packbits(planes.reshape(good.size, n * high_bits), axis=1, bitorder="little")
        out[:, at:] = packed
        for row in out:
            row[13:17] = np.frombuffer(_checksum(row[:13].data, row[_HEAD.size :].data), dtype=np.uint8)
        if out is not rows:
            rows[good] = out
    for i in odd:
        wire = seal_to_wire(streams[i], params)
        if len(wire) != rows.shape[1]:
            raise CryptoError("SEAL saved a ciphertext that is not a fresh seeded one")
        rows[i] = np.frombuffer(wire, dtype=np.uint8)
    return rows


def check_wire(data: bytes, params: WireParams, *, checksum: bool = True) -> int:
    """Validate everything that can be checked without SEAL; returns the kind.

    Cheap (a hash of the bytes), so the aggregator runs it on every block before the chunk
    enters its WAL, and each kind of damage gets its own dead-letter reason. ``checksum=False``
    skips only the hash, for bytes whose hash was already checked and that stayed in the
    checker's own memory or CRC-framed log since (the aggregator's fold of logged chunks)."""
    if len(data) < _HEAD.size:
        raise CiphertextTruncated(f"ciphertext of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, version, preset_id, kind, key_id, stored = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CiphertextMalformed("not a fedmq ciphertext (bad magic)")
    if version != FORMAT_VERSION or preset_id != params.preset_id:
        raise CiphertextParameters(
            f"ciphertext made for format {version} / preset id {preset_id}; this key uses "
            f"format {FORMAT_VERSION} / preset id {params.preset_id}"
        )
    if kind not in (KIND_SEEDED, KIND_FULL):
        raise CiphertextMalformed(f"unknown ciphertext kind {kind}")
    if kind == KIND_SEEDED and len(data) > _HEAD.size and data[_HEAD.size] != SEED_BYTES:
        raise CiphertextSeedLength(f"seed of {data[_HEAD.size]} bytes; SEAL seeds are {SEED_BYTES}")
    expected = params.size(kind)
    if len(data) < expected:
        raise CiphertextTruncated(f"ciphertext of {len(data)} bytes; this preset's are {expected}")
    if len(data) > expected:
        raise CiphertextMalformed(f"ciphertext of {len(data)} bytes; this preset's are {expected}")
    mv = memoryview(data)
    if checksum and _checksum(mv[:13], mv[_HEAD.size :]) != stored:
        raise CiphertextCorrupt("ciphertext checksum mismatch (corrupted or bit-flipped)")
    if key_id != params.key_id:
        raise CiphertextWrongKey(f"ciphertext made with key id {key_id.hex()}, not this federation's {params.key_id.hex()}")
    return kind


def wire_to_seal(data: bytes, params: WireParams, *, checksum: bool = True) -> bytes:
    """fedmq's packed bytes -> an uncompressed SEAL stream that ``Ciphertext.load`` reads
    (``checksum``: see ``check_wire``)."""
    kind = check_wire(data, params, checksum=checksum)
    mv = memoryview(data)[_HEAD.size :]
    n, bits = params.n, params.bits
    if kind == KIND_SEEDED:
        prng_type, seed = mv[1], bytes(mv[2 : 2 + SEED_BYTES])
        mv = mv[2 + SEED_BYTES :]
        polys = [_unpack_poly(mv, n, bits)]
    else:
        pb = params.poly_bytes()
        polys = [_unpack_poly(mv[:pb], n, bits), _unpack_poly(mv[pb:], n, bits)]
    coeffs = polys[0] if len(polys) == 1 else np.concatenate(polys)
    if int(coeffs.max()) >= params.modulus:
        raise CiphertextMalformed("ciphertext coefficient not reduced modulo the prime")
    count = coeffs.size
    parts = [
        _prefix(params, size=2),
        _seal_header(params, _SEAL_HEADER.size + 8 + 8 * count),
        struct.pack("<Q", count),
        coeffs.astype("<u8", copy=False).tobytes(),
    ]
    if kind == KIND_SEEDED:
        parts += [_seal_header(params, _SEAL_HEADER.size + 1 + SEED_BYTES), bytes([prng_type]), seed]
    body = b"".join(parts)
    return _seal_header(params, _SEAL_HEADER.size + len(body)) + body


def _seal_header(params: WireParams, size: int) -> bytes:
    major, minor = params.seal_version
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, major, minor, _COMPR_NONE, 0, size)


def _prefix(params: WireParams, *, size: int) -> bytes:
    """SEAL's ciphertext members before its coefficient array (parms id .. correction factor)."""
    return (
        struct.pack("<4Q", *params.parms_id)
        + b"\x01"  # CKKS ciphertexts are kept in NTT form
        + struct.pack("<QQQdQ", size, params.n, 1, params.scale, 1)
    )
