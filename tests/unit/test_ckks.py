"""fedmq.shared.ckks (the HE seam) and fedmq.shared.ckks_wire (its byte format): the encrypted weighted
average meets the error budget up to the headroom, the wire format is at its floor, the
aggregator's public key can fold but never decrypt, and each kind of damaged ciphertext is
refused with its own reason."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import zstandard

from fedmq.shared import ckks, ckks_wire
from fedmq.shared.chunking import ChunkAssembler
from fedmq.shared.ckks import (
    AGGREGATION_ERROR_BUDGET,
    DEFAULT_PRESET,
    PRESETS,
    LoadedContext,
    accumulate,
    check_ciphertext,
    decrypt_block,
    encrypt_block,
    init_keys,
    load_ciphertext,
    load_context,
    scale_by_int,
    serialize,
    sum_vectors,
)
from fedmq.shared.codec import decode_update_chunk, encode
from fedmq.shared.errors import CryptoError, SecretKeyPresentError, WireError
from fedmq.shared.signing import new_signing_key, verify_chunk
from fedmq.shared.sparsify import densify

#: HomomorphicEncryption.org standard, 128-bit classical security, ternary secret
HE_STANDARD_MAX_MODULUS_BITS = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}


@pytest.fixture(scope="module", params=sorted(PRESETS))
def keys(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedContext, LoadedContext]:
    files = init_keys(tmp_path_factory.mktemp(request.param), request.param)
    return load_context(files.secret_context, require_secret=True), load_context(files.public_context, require_secret=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_meet_128_bit_security_and_the_budget_on_paper(name: str) -> None:
    p = PRESETS[name]
    assert p.modulus_bits <= HE_STANDARD_MAX_MODULUS_BITS[p.poly_modulus_degree]
    assert p.scale_bits < p.prime_bits
    # headroom: 64 updates x weight 1000 x |x| 100 must fit; the fold guard allows at least that
    assert 64 * 1000 * 100 < p.headroom and p.fold_units_limit >= 64 * 1000
    assert p.fold_units_limit * p.value_bound <= p.headroom
    assert p.error_bound < AGGREGATION_ERROR_BUDGET


def test_seal_refuses_a_modulus_beyond_the_128_bit_bound() -> None:
    too_big = ckks.CkksPreset("n2048-q55", 99, 2048, 55, 25, 1.0)  # 55 > 54 bits for N = 2048
    with pytest.raises((CryptoError, ValueError)):
        ckks._seal_context(too_big)


def test_default_format_is_at_the_floor() -> None:
    p = PRESETS[DEFAULT_PRESET]
    assert p.bytes_per_value <= 6.2  # issue 13: <= 7.1 bytes/value, goal 6.2
    # c0 at exactly the prime's bits, plus an 83-byte header with the seed, per block
    assert p.seeded_bytes == p.block_size * p.prime_bits // 8 + 83


@pytest.mark.parametrize("seed", [0, 1])
def test_encrypted_weighted_average_meets_the_error_budget(keys: tuple[LoadedContext, LoadedContext], seed: int) -> None:
    """64 updates, integer weights up to 1000, |x| <= 100: the issue's error budget."""
    secret, public = keys
    rng = np.random.default_rng(seed)
    n_sites, size, bound = 64, secret.block_size, secret.preset.value_bound
    updates = rng.uniform(-bound, bound, size=(n_sites, size))
    updates[0, :4] = [-bound, bound, -bound, bound]  # the ends of the stated range
    units = rng.integers(1, 1001, size=n_sites)
    units[0] = 1000
    wire = [encrypt_block(secret, u) for u in updates]
    # the aggregator: public context only, integer weights, then a sum
    folded = None
    for c, w in zip(wire, units):
        folded = accumulate(folded, load_ciphertext(public, c), int(w))
    assert folded is not None
    average = decrypt_block(secret, serialize(folded)) / units.sum()
    expected = (units[:, None].astype(np.float64) * updates).sum(axis=0) / units.sum()
    error = float(np.max(np.abs(average - expected)))
    assert error <= AGGREGATION_ERROR_BUDGET, f"{secret.preset.name}: max abs error {error:.3g}"


def test_headroom_corner_holds_and_a_wrap_is_detected(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, public = keys
    bound = secret.preset.value_bound
    values = np.where(np.arange(secret.block_size) % 2 == 0, bound, -bound)
    ct = encrypt_block(secret, values)
    folded = None
    for _ in range(64):
        folded = accumulate(folded, load_ciphertext(public, ct), 1000)  # |sum| = 6.4e6 per value
    assert folded is not None
    got = decrypt_block(secret, serialize(folded)) / 64_000
    assert float(np.max(np.abs(got - values))) <= AGGREGATION_ERROR_BUDGET
    # past the headroom the sum wraps; the decrypting site refuses it instead of using garbage
    over = int(1.08 * secret.preset.headroom / bound)
    with pytest.raises(CryptoError, match="headroom"):
        decrypt_block(secret, scale_by_int(load_ciphertext(public, ct), over))


def test_scale_by_int_matches_multiplication(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, public = keys
    values = np.linspace(-100, 100, 64)
    vec = load_ciphertext(public, encrypt_block(secret, values))
    for factor in (1, 2, 3, 7, 64, 127, 1000):
        got = decrypt_block(secret, serialize(scale_by_int(vec, factor)))[:64]
        np.testing.assert_allclose(got, factor * values, rtol=0, atol=factor * 1e-6)
    np.testing.assert_allclose(decrypt_block(secret, serialize(vec))[:64], values, atol=1e-6)  # input untouched
    np.testing.assert_allclose(decrypt_block(secret, sum_vectors([vec] * 3))[:64], 3 * values, atol=3e-6)
    with pytest.raises(ValueError):
        scale_by_int(vec, 0)


def test_wire_sizes_and_seal_stream_layout(keys: tuple[LoadedContext, LoadedContext]) -> None:
    """Our rebuilt SEAL stream is byte-identical to SEAL's own save, for fresh (seeded) and
    folded (two-polynomial) ciphertexts: a SEAL upgrade that moves a field fails here."""
    secret, public = keys
    p = secret.preset
    ct = encrypt_block(secret, np.linspace(-1, 1, p.block_size))
    assert len(ct) == p.seeded_bytes
    folded = accumulate(load_ciphertext(public, ct), load_ciphertext(public, ct), 3)
    assert len(serialize(folded)) == p.folded_bytes
    for original in (ckks._save(folded._ct, "t"),
                     ckks._save(secret._encryptor.encrypt_symmetric(_plain(secret)), "t")):
        rebuilt = ckks_wire.wire_to_seal(ckks_wire.seal_to_wire(original, secret._wire), secret._wire)
        body = zstandard.ZstdDecompressor().decompress(original[16:], max_output_size=1 << 20)
        assert rebuilt[16:] == body


def _plain(ctx: LoadedContext) -> object:
    pt = ckks.seal.Plaintext()
    ctx._encoder.encode(ctx._slots.to_slots(np.linspace(-1, 1, ctx.block_size)).tolist(), ctx._scale, pt)
    return pt


def test_encrypt_refuses_out_of_range_and_non_finite(keys: tuple[LoadedContext, LoadedContext]) -> None:
    secret, _ = keys
    limit = secret.preset.value_bound
    encrypt_block(secret, np.array([limit, -limit]))
    for bad in (2 * limit, np.nan, np.inf, -np.inf):
        with pytest.raises(CryptoError):
            encrypt_block(secret, np.array([0.0, bad]))
    with pytest.raises(ValueError):
        encrypt_block(secret, np.zeros(secret.block_size + 1))


def test_public_context_cannot_decrypt_or_encrypt(tmp_path: Path) -> None:
    files = init_keys(tmp_path)
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)  # what the aggregator loads
    assert not public.is_private and public._secret is None
    assert secret.is_private and public.fingerprint == secret.fingerprint == files.fingerprint
    ct = encrypt_block(secret, np.full(10, 0.25))
    vec = load_ciphertext(public, ct)
    with pytest.raises(CryptoError):
        decrypt_block(public, ct)
    with pytest.raises(CryptoError):
        decrypt_block(public, vec)
    with pytest.raises(CryptoError):
        encrypt_block(public, np.zeros(3))
    # the public file is a header only: parameters and key id, no key material at all
    assert files.public_context.read_bytes().endswith(b"}\n")
    # the secret file is not loadable where a public one is required, and vice versa
    with pytest.raises(SecretKeyPresentError):
        load_context(files.secret_context, require_secret=False)
    with pytest.raises(CryptoError) as info:
        load_context(files.public_context, require_secret=True)
    assert not isinstance(info.value, SecretKeyPresentError)
    assert load_context(files.secret_context).is_private  # require_secret=None: either
    np.testing.assert_allclose(decrypt_block(secret, ct)[:10], 0.25, atol=1e-6)


def test_key_files_and_refusals(tmp_path: Path) -> None:
    files = init_keys(tmp_path)
    scratch = Path(ckks._scratch_path("probe")).parent  # sealapi's file I/O: the key never stays there
    assert not [p for p in scratch.iterdir() if p.name.startswith("key-")]
    load_context(files.secret_context, require_secret=True)
    scratch = Path(ckks._scratch_path("probe")).parent  # sealapi's file I/O: the key never stays there
    assert not [p for p in scratch.iterdir() if p.name.startswith("key-")]
    assert files.fingerprint.startswith(f"{DEFAULT_PRESET}:")
    assert (tmp_path / ckks.FINGERPRINT_FILE).read_text().strip() == files.fingerprint
    assert stat.S_IMODE(files.secret_context.stat().st_mode) == 0o600
    assert files.public_context.stat().st_size < files.secret_context.stat().st_size
    with pytest.raises(CryptoError):
        init_keys(tmp_path)  # never overwrite key material
    other = init_keys(tmp_path / "again")
    assert other.fingerprint != files.fingerprint  # same parameters, different key id
    for name in ("n1024-q20", "n4096-q54"):
        with pytest.raises(CryptoError):
            init_keys(tmp_path / "x", name)
    with pytest.raises(CryptoError):
        load_context(tmp_path / "missing.ckks")
    bad = tmp_path / "bad.ckks"
    bad.write_bytes(b"not a key file")
    with pytest.raises(CryptoError):
        load_context(bad)
    bad.write_bytes(files.secret_context.read_bytes()[:-10])
    with pytest.raises(CryptoError):
        load_context(bad)
    # a header that claims other parameters than the preset's
    bad.write_bytes(files.public_context.read_bytes().replace(b'"scale_bits": 25', b'"scale_bits": 30'))
    with pytest.raises(CryptoError, match="parameters"):
        load_context(bad)


def test_key_file_of_a_retired_preset_says_what_to_do(tmp_path: Path) -> None:
    old = tmp_path / "aggregator-public.ckks"
    old.write_bytes(b"FEDMQCKKS1\nn4096-q54:0123456789abcdef\n" + b"\x00" * 100)
    with pytest.raises(CryptoError) as info:
        load_context(old)
    message = str(info.value)
    assert str(old) in message and "n4096-q54" in message and "fedmq keys init" in message


def _damage(kind: str, ct: bytes, foreign: bytes) -> bytes:
    if kind == "malformed":
        return b"\x00garbage" + ct[9:]
    if kind == "truncated":
        return ct[:-50]
    if kind == "truncated-header":
        return ct[:7]
    if kind == "bit-flip":
        flipped = bytearray(ct)
        flipped[5000] ^= 0x10
        return bytes(flipped)
    if kind == "seed-length":
        return ct[:17] + bytes([32]) + ct[18:]
    if kind == "parameters":
        return ct[:3] + bytes([ct[3] + 1]) + ct[4:]
    if kind == "other-key":
        return foreign
    if kind == "extra-bytes":
        return ct + b"\x00"
    raise AssertionError(kind)


BAD_CIPHERTEXTS = {
    "malformed": "ciphertext-malformed", "truncated": "ciphertext-truncated",
    "truncated-header": "ciphertext-truncated", "bit-flip": "ciphertext-corrupt",
    "seed-length": "ciphertext-seed", "parameters": "ciphertext-params", "other-key": "ciphertext-key",
    "extra-bytes": "ciphertext-malformed",
}


@pytest.mark.parametrize("kind", sorted(BAD_CIPHERTEXTS))
def test_each_damaged_ciphertext_is_refused_with_its_own_reason(tmp_path: Path, kind: str) -> None:
    files = init_keys(tmp_path / "ours")
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)
    foreign_key = load_context(init_keys(tmp_path / "theirs").secret_context, require_secret=True)
    ct = encrypt_block(secret, np.linspace(-1, 1, 100))
    bad = _damage(kind, ct, encrypt_block(foreign_key, np.linspace(-1, 1, 100)))
    for check in (check_ciphertext, load_ciphertext):
        with pytest.raises(WireError) as info:
            check(public, bad)
        assert info.value.reason == BAD_CIPHERTEXTS[kind]
        assert isinstance(info.value, CryptoError)
    load_ciphertext(public, ct)  # the undamaged one still loads


def test_a_coefficient_beyond_the_prime_is_refused(keys: tuple[LoadedContext, LoadedContext]) -> None:
    """Bytes with a valid checksum (a site's own) but an unreduced coefficient: SEAL would reject
    them later; the codec refuses first."""
    secret, public = keys
    params = secret._wire
    n, head = params.n, 17 + 2 + ckks_wire.SEED_BYTES
    ct = bytearray(encrypt_block(secret, np.zeros(4)))
    ct[head : head + 6] = b"\xff" * 6
    ct[head + 6 * n] |= 1  # top bit of coefficient 0: 2^49 - 1 >= q
    ct[13:17] = ckks_wire._checksum(bytes(ct[:13]), bytes(ct[17:]))
    with pytest.raises(WireError) as info:
        load_ciphertext(public, bytes(ct))
    assert info.value.reason == "ciphertext-malformed"


def test_parallel_encryption_matches_the_serial_path(keys: tuple[LoadedContext, LoadedContext]) -> None:
    from fedmq.shared.ckks_pool import MIN_PARALLEL_BLOCKS, encrypt_blocks_parallel

    secret, _ = keys
    blocks = np.random.default_rng(3).uniform(-1, 1, (MIN_PARALLEL_BLOCKS + 5, secret.block_size))
    blocks[7, 100:] = 0.0
    cts = encrypt_blocks_parallel(secret, blocks, workers=2)
    assert len(cts) == len(blocks)
    for ct, b in zip(cts, blocks):
        np.testing.assert_allclose(decrypt_block(secret, ct), b, atol=1e-6)
    blocks[9, 3] = np.nan
    with pytest.raises(CryptoError):
        encrypt_blocks_parallel(secret, blocks, workers=2)


def test_update_builder_end_to_end(tmp_path: Path) -> None:
    """A site's update, through signing, the wire and reassembly, folds to its sparse delta."""
    from fedmq.site_agent.update_builder import UpdateIdentity, build_update

    files = init_keys(tmp_path)
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)
    key = new_signing_key()
    rng = np.random.default_rng(5)
    size, slots = 10 * secret.block_size + 77, secret.block_size
    delta = rng.uniform(-0.5, 0.5, size) * np.repeat(rng.uniform(0, 1, 11), slots)[:size]
    built = build_update(
        delta, None, UpdateIdentity("site-a", 1, 0, 32.0), secret, "f" * 32, key,
        mode="topk", fraction=0.3, max_message_bytes=60_000,
    )
    assert len(built.sent_indices) == 4 and len(built.chunks) > 1
    asm: ChunkAssembler = ChunkAssembler(lambda c: c.update_id)
    done = None
    for chunk in reversed(built.chunks):
        data = encode(chunk)
        assert len(data) <= 60_000
        received = decode_update_chunk(data, 60_000)
        verify_chunk(received, {"site-a": key.public_key()})
        done = asm.add(received, len(data))
    assert done is not None and tuple(b.index for b in done.blocks) == built.sent_indices
    assert done.header.key_fingerprint == public.fingerprint
    sums = [load_ciphertext(public, b.ciphertext) for b in done.blocks]
    decrypted = np.stack([decrypt_block(secret, serialize(v)) for v in sums])
    recovered = densify(built.sent_indices, decrypted, size, slots)
    np.testing.assert_allclose(recovered + built.residual, delta, rtol=0, atol=AGGREGATION_ERROR_BUDGET)


def test_batch_encryption_gives_the_serial_bytes(keys: tuple[LoadedContext, LoadedContext]) -> None:
    """The batched site path changes no byte: the slot FFT over many rows equals the per-row one
    bit for bit, and the batched parse-and-pack of SEAL's streams equals ``seal_to_wire`` on each
    stream, including a stream that is not a fresh seeded one (it goes the per-stream way and
    gets that way's error)."""
    secret, public = keys
    rng = np.random.default_rng(13)
    blocks = rng.uniform(-100, 100, (21, secret.block_size))
    blocks[4] = 0.0
    slots = secret._slots.to_slots(blocks)
    sm = secret._slots
    for row, b in zip(slots, blocks):
        assert np.array_equal(row, sm.to_slots(b))
        assert np.array_equal(row, (sm.n * np.fft.ifft(b * sm.twist))[sm.index])  # the first format's formula
    streams = []
    for row in slots:
        plain = ckks.seal.Plaintext()
        secret._encoder.encode(row.tolist(), secret._scale, plain)
        streams.append(ckks._save(secret._encryptor.encrypt_symmetric(plain), "t"))
    packed = ckks_wire.seeded_streams_to_wire(streams, secret._wire)
    assert packed.shape == (len(streams), secret.preset.seeded_bytes)
    for row, stream in zip(packed, streams):
        assert row.tobytes() == ckks_wire.seal_to_wire(stream, secret._wire)
    assert ckks_wire.seeded_streams_to_wire([], secret._wire).shape == (0, secret.preset.seeded_bytes)
    # an uncompressed stream (SEAL's other mode) takes the per-stream path, same bytes
    body = zstandard.ZstdDecompressor().decompress(streams[2][16:], max_output_size=1 << 20)
    plain_stream = ckks_wire._seal_header(secret._wire, 16 + len(body)) + body
    mixed = ckks_wire.seeded_streams_to_wire([streams[0], plain_stream, streams[1]], secret._wire)
    assert [r.tobytes() for r in mixed] == [ckks_wire.seal_to_wire(s, secret._wire)
                                            for s in (streams[0], streams[2], streams[1])]
    # a folded (two-polynomial) ciphertext is not a fresh one: refused, not mis-packed
    folded = accumulate(load_ciphertext(public, packed[0].tobytes()), load_ciphertext(public, packed[1].tobytes()), 1)
    with pytest.raises(CryptoError):
        ckks_wire.seeded_streams_to_wire([streams[0], ckks._save(folded._ct, "t")], secret._wire)
    # and the whole batch path decrypts to its values; short rows are zero-padded
    cts = ckks.encrypt_blocks(secret, blocks[:3, :100])
    for ct, b in zip(cts, blocks[:3]):
        got = decrypt_block(secret, ct.tobytes())
        np.testing.assert_allclose(got[:100], b[:100], atol=AGGREGATION_ERROR_BUDGET)
        np.testing.assert_allclose(got[100:], 0.0, atol=AGGREGATION_ERROR_BUDGET)
    with pytest.raises(CryptoError):
        ckks.encrypt_blocks(secret, np.full((2, 8), np.inf))
    with pytest.raises(ValueError):
        ckks.encrypt_blocks(secret, np.zeros((1, secret.block_size + 1)))


def test_pipelined_build_chunks_as_the_plain_chunker_would(tmp_path: Path) -> None:
    """The site chunks with stand-ins and fills each chunk as its ciphertexts arrive: the chunks
    hold every block once, in order, grouped exactly as ``chunk_blocks`` groups the real ones,
    for one shard and for three, through the worker pool and in-process."""
    from fedmq.shared.chunking import chunk_blocks
    from fedmq.shared.ckks_pool import MIN_PARALLEL_BLOCKS
    from fedmq.site_agent.update_builder import UpdateIdentity, build_update

    files = init_keys(tmp_path)
    secret = load_context(files.secret_context, require_secret=True)
    key = new_signing_key()
    rng = np.random.default_rng(8)
    for blocks, shards, workers in ((MIN_PARALLEL_BLOCKS + 9, 1, 2), (MIN_PARALLEL_BLOCKS + 9, 3, 2), (7, 2, 1)):
        delta = rng.uniform(-0.5, 0.5, blocks * secret.block_size - 5)
        built = build_update(delta, None, UpdateIdentity("site-a", 1, 0, 1.0), secret, "f" * 32, key,
                             mode="dense", max_message_bytes=200_000, shard_count=shards, encrypt_workers=workers)
        assert built.sent_indices == tuple(range(blocks))
        assert [b.index for c in built.chunks for b in c.blocks] == list(range(blocks))
        for shard in range(shards):
            mine = [c for c in built.chunks if c.shard_index == shard]
            real = [b for c in mine for b in c.blocks]
            regrouped = chunk_blocks(mine[0].model_copy(update={"signature": b""}), real, 200_000)
            assert [[b.index for b in c.blocks] for c in regrouped] == [[b.index for b in c.blocks] for c in mine]
            assert all(c.chunk_count == len(mine) for c in mine)
            for c in mine:
                verify_chunk(c, {"site-a": key.public_key()})
        for c in built.chunks[:2]:
            for b in c.blocks[:2]:
                start = b.index * secret.block_size
                want = ckks.pad_block(delta[start : start + secret.block_size], secret.block_size)
                np.testing.assert_allclose(decrypt_block(secret, b.ciphertext), want, atol=AGGREGATION_ERROR_BUDGET)


def test_adding_on_the_wire_bytes_is_seals_addition_word_for_word(keys: tuple[LoadedContext, LoadedContext]) -> None:
    """ckks_wire.add_full (numpy, no SEAL: what the aggregator's commit workers run) gives the
    very bytes SEAL's add + serialize give, including the modular wrap of every coefficient."""
    secret, public = keys
    rng = np.random.default_rng(7)
    x = rng.uniform(-1, 1, (3, secret.block_size))
    a, b = (ckks.load_ciphertext(public, encrypt_block(secret, row)) for row in x[:2])
    d_bytes = ckks.serialize(a)  # a full ciphertext, as D holds it
    expected = ckks.serialize(ckks.add_inplace(ckks.load_ciphertext(public, d_bytes, checked=True), b))
    assert ckks.add_to_wire(public, d_bytes, ckks.save_for_add(b)) == expected
    assert ckks.add_to_wire(public, None, ckks.save_for_add(b)) == ckks.serialize(b)  # a block D does not have yet
    np.testing.assert_allclose(decrypt_block(secret, expected), x[0] + x[1], atol=1e-6)
    # a seeded (fresh) ciphertext is not what D holds: refused, not silently mis-added
    with pytest.raises(CryptoError, match="full ciphertexts"):
        ckks.add_to_wire(public, encrypt_block(secret, x[2]), ckks.save_for_add(b))


def test_commit_workers_give_the_engines_bytes_and_a_dead_worker_loses_nothing(keys: tuple[LoadedContext, LoadedContext]) -> None:
    from fedmq.aggregator import fold
    from fedmq.aggregator.blockstore import ADD_BATCH, CiphertextStore
    from fedmq.shared.ckks_pool import AddPool

    secret, public = keys
    rng = np.random.default_rng(3)
    n_blocks = 3 * ADD_BATCH + 1  # several batches in flight, and a short last one
    x = rng.uniform(-1, 1, (2, n_blocks, secret.block_size))

    def buffer(i: int) -> dict[int, ckks.HeVector]:
        return {b: ckks.load_ciphertext(public, encrypt_block(secret, x[i][b])) for b in range(n_blocks)}

    first, second = buffer(0), buffer(1)
    alone = CiphertextStore(public, {})
    fold.commit(alone, dict(first))
    base = dict(alone.data)
    fold.commit(alone, dict(second))
    pool = AddPool(ckks.wire_params(public), 1)
    try:
        pooled = CiphertextStore(public, {}, pool)
        fold.commit(pooled, dict(first))
        assert pooled.data == base
        fold.commit(pooled, dict(second))
        assert pooled.data == alone.data and pooled.pool is pool
        # the worker dies: the commit finishes in the engine's thread, same bytes, and the
        # store stops using the broken pool
        pool.workers[0].proc.kill()
        pool.workers[0].proc.wait()
        after_kill = CiphertextStore(public, dict(base), pool)
        fold.commit(after_kill, dict(second))
        assert after_kill.data == alone.data and after_kill.pool is None
    finally:
        pool.close()
    np.testing.assert_allclose(decrypt_block(secret, alone.data[n_blocks - 1]), x[0][-1] + x[1][-1], atol=1e-6)


def test_a_killed_process_leaves_no_ciphertext_on_tmpfs(tmp_path: Path) -> None:
    """The scratch directory of a SIGKILLed process (no atexit) is removed by the next process
    that needs one; a live process's directory is kept."""
    import os
    import subprocess
    import sys

    base = ckks._scratch_path("probe").rsplit("/", 2)[0]
    code = ("import os, signal, numpy as np, sys; from fedmq.shared import ckks; "
            "k = ckks.init_keys(sys.argv[1]); c = ckks.load_context(k.secret_context); "
            "ckks.encrypt_block(c, np.zeros(4)); print(ckks._scratch_path('ct'), flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "k")], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[2])
    left = Path(proc.stdout.strip()).parent
    assert proc.returncode == -9 and left.is_dir() and str(left).startswith(base)
    mine = Path(ckks._scratch_path("probe")).parent
    ckks._sweep_scratch(base)
    assert not left.exists() and mine.is_dir()
    assert mine.name.startswith(f"fedmq-he-{os.getpid()}-")
