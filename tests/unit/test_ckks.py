"""shared.ckks: the encrypted weighted sum matches the plaintext one within the error budget,
and the aggregator's public context can add but never decrypt."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts

from shared import ckks
from shared.chunking import ChunkAssembler
from shared.ckks import (
    AGGREGATION_ERROR_BUDGET,
    DEFAULT_PRESET,
    PRESETS,
    LoadedContext,
    decrypt_block,
    encrypt_block,
    init_keys,
    load_ciphertext,
    load_context,
    scale_by_int,
    sum_vectors,
)
from shared.codec import decode_update_chunk, encode
from shared.errors import CryptoError, SecretKeyPresentError
from shared.signing import new_signing_key, verify_chunk
from shared.sparsify import densify

#: HomomorphicEncryption.org standard, 128-bit classical security, ternary secret
HE_STANDARD_MAX_MODULUS_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def keys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedContext, LoadedContext]:
    files = init_keys(tmp_path_factory.mktemp(request.param), request.param)
    return load_context(files.secret_context, require_secret=True), load_context(files.public_context, require_secret=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_meet_128_bit_security(name: str) -> None:
    p = PRESETS[name]
    assert sum(p.coeff_mod_bit_sizes) <= HE_STANDARD_MAX_MODULUS_BITS[p.poly_modulus_degree]
    assert p.scale_bits < p.coeff_mod_bit_sizes[0]
    assert p.slots == p.poly_modulus_degree // 2


def test_seal_refuses_a_modulus_beyond_the_128_bit_bound() -> None:
    with pytest.raises(ValueError):
        ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[55, 55])  # 110 > 109 bits


def test_default_preset_is_additions_only() -> None:
    assert DEFAULT_PRESET in PRESETS
    assert len(PRESETS[DEFAULT_PRESET].coeff_mod_bit_sizes) == 2  # one data prime + the special prime


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encrypted_weighted_average_meets_the_error_budget(keys: tuple[LoadedContext, LoadedContext], seed: int) -> None:
    secret, public = keys
    rng = np.random.default_rng(seed)
    n_sites, slots = 8, secret.preset.slots
    updates = rng.uniform(-1.0, 1.0, size=(n_sites, slots))
    updates[0, :4] = [-1.0, 1.0, -1.0, 1.0]  # the ends of the stated range
    units = rng.integers(1, 129, size=n_sites)
    units[0] = 128
    wire = [encrypt_block(secret, u) for u in updates]
    # the aggregator: public context only, integer weights by double-and-add, then a sum
    vectors = [load_ciphertext(public, c) for c in wire]
    folded = sum_vectors([scale_by_int(v, int(w)) for v, w in zip(vectors, units)])
    result = folded.serialize()
    # a key holder decrypts and divides by the unit sum
    average = decrypt_block(secret, result)[:slots] / units.sum()
    expected = (units[:, None].astype(np.float64) * updates).sum(axis=0) / units.sum()
    error = float(np.max(np.abs(average - expected)))
    assert error <= AGGREGATION_ERROR_BUDGET, f"{secret.preset.name}: max abs error {error:.3g}"


def test_scale_by_int_matches_multiplication(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, public = keys
    values = np.linspace(-1, 1, 64)
    vec = load_ciphertext(public, encrypt_block(secret, values))
    for factor in (1, 2, 3, 7, 64, 127, 1000):
        got = decrypt_block(secret, scale_by_int(vec, factor).serialize())[:64]
        np.testing.assert_allclose(got, factor * values, rtol=0, atol=factor * 1e-6)
    np.testing.assert_allclose(decrypt_block(secret, vec.serialize())[:64], values, atol=1e-6)  # input untouched
    with pytest.raises(ValueError):
        scale_by_int(vec, 0)


def test_ciphertexts_sit_at_the_last_modulus(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, public = keys
    p = secret.preset
    ct = encrypt_block(secret, np.zeros(p.slots))
    summed = sum_vectors([load_ciphertext(public, ct)] * 3).serialize()
    per_value = len(ct) / p.slots
    data_primes = len(p.coeff_mod_bit_sizes) - 1
    # 2 polynomials * N coefficients * 8-byte words per data prime / (N/2 slots), plus framing;
    # SEAL's compression gets close to the information bound of the data primes' bits
    assert 4 * sum(p.coeff_mod_bit_sizes[:data_primes]) / 8 <= per_value <= 32 * data_primes * 1.01
    assert abs(len(summed) - len(ct)) / len(ct) < 0.05  # additions do not grow ciphertexts
    if p.name == DEFAULT_PRESET:
        assert per_value < 32


def test_encrypt_refuses_out_of_range_and_non_finite(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, _ = keys
    limit = secret.preset.max_abs_value
    encrypt_block(secret, np.array([limit, -limit]))
    for bad in (2 * limit, np.nan, np.inf, -np.inf):
        with pytest.raises(CryptoError):
            encrypt_block(secret, np.array([0.0, bad]))
    with pytest.raises(ValueError):
        encrypt_block(secret, np.zeros(secret.preset.slots + 1))


def test_public_context_cannot_decrypt_or_encrypt(tmp_path: Path) -> None:
    files = init_keys(tmp_path)
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)  # what the aggregator loads
    assert not public.context.has_secret_key() and not public.is_private
    assert secret.is_private and public.fingerprint == secret.fingerprint == files.fingerprint
    ct = encrypt_block(secret, np.full(10, 0.25))
    vec = load_ciphertext(public, ct)
    with pytest.raises(CryptoError):
        decrypt_block(public, ct)
    with pytest.raises(CryptoError):
        decrypt_block(public, vec)
    with pytest.raises(ValueError, match="secret"):  # TenSEAL itself refuses, too
        vec.decrypt()
    with pytest.raises(CryptoError):
        encrypt_block(public, np.zeros(3))
    # even the raw TenSEAL context from the public file holds no secret key
    raw = ts.context_from(files.public_context.read_bytes().split(b"\n", 2)[2])
    assert not raw.has_secret_key() and not raw.is_private()
    # the secret file is not loadable where a public one is required, and vice versa
    with pytest.raises(SecretKeyPresentError):
        load_context(files.secret_context, require_secret=False)
    with pytest.raises(CryptoError) as info:
        load_context(files.public_context, require_secret=True)
    assert not isinstance(info.value, SecretKeyPresentError)
    assert load_context(files.secret_context).is_private  # require_secret=None: either
    np.testing.assert_allclose(decrypt_block(secret, ct)[:10], 0.25, atol=1e-7)


def test_key_files_and_refusals(tmp_path: Path) -> None:
    files = init_keys(tmp_path, "n4096-q50")
    assert files.fingerprint.startswith("n4096-q50:")
    assert (tmp_path / ckks.FINGERPRINT_FILE).read_text().strip() == files.fingerprint
    assert stat.S_IMODE(files.secret_context.stat().st_mode) == 0o600
    assert files.public_context.stat().st_size < files.secret_context.stat().st_size
    with pytest.raises(CryptoError):
        init_keys(tmp_path)  # never overwrite key material
    other = init_keys(tmp_path / "again", "n4096-q50")
    assert other.fingerprint != files.fingerprint  # same parameters, different key id
    with pytest.raises(CryptoError):
        init_keys(tmp_path / "x", "n1024-q20")
    with pytest.raises(CryptoError):
        load_context(tmp_path / "missing.ckks")
    bad = tmp_path / "bad.ckks"
    bad.write_bytes(b"not a key file")
    with pytest.raises(CryptoError):
        load_context(bad)
    bad.write_bytes(files.public_context.read_bytes()[:-10])
    with pytest.raises(CryptoError):
        load_context(bad)
    public = load_context(files.public_context)
    for garbage in (b"\x00garbage", b"", b"x" * 100, encrypt_block(load_context(files.secret_context), np.ones(3))[:-50]):
        with pytest.raises(CryptoError):
            load_ciphertext(public, garbage)


def test_update_builder_end_to_end(tmp_path: Path) -> None:
    """A site's update, through signing, the wire and reassembly, folds to its sparse delta."""
    from site_agent.update_builder import UpdateIdentity, build_update

    files = init_keys(tmp_path)
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)
    key = new_signing_key()
    rng = np.random.default_rng(5)
    size, slots = 10 * 2048 + 77, secret.preset.slots
    delta = rng.uniform(-0.5, 0.5, size) * np.repeat(rng.uniform(0, 1, 11), slots)[:size]
    built = build_update(
        delta, None, UpdateIdentity("site-a", 1, 0, 32.0), secret, "f" * 32, key,
        mode="topk", fraction=0.3, max_message_bytes=200_000,
    )
    assert len(built.sent_indices) == 4 and len(built.chunks) > 1
    asm: ChunkAssembler = ChunkAssembler(lambda c: c.update_id)
    done = None
    for chunk in reversed(built.chunks):
        data = encode(chunk)
        assert len(data) <= 200_000
        received = decode_update_chunk(data, 200_000)
        verify_chunk(received, {"site-a": key.public_key()})
        done = asm.add(received, len(data))
    assert done is not None and tuple(b.index for b in done.blocks) == built.sent_indices
    assert done.header.key_fingerprint == public.fingerprint
    sums = [load_ciphertext(public, b.ciphertext) for b in done.blocks]
    decrypted = np.stack([decrypt_block(secret, v.serialize()) for v in sums])
    recovered = densify(built.sent_indices, decrypted, size, slots)
    np.testing.assert_allclose(recovered + built.residual, delta, rtol=0, atol=AGGREGATION_ERROR_BUDGET)
