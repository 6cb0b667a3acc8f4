"""fedmq.shared.signing: hybrid Ed25519 + ML-DSA-65 over each chunk; forged, altered, half-signed or
unknown-site chunks are refused."""

from __future__ import annotations

import stat

import msgpack
import pytest

from fedmq.shared.codec import decode_update_chunk, encode
from fedmq.shared.errors import ConfigError, SignatureInvalid, UnknownSite
from fedmq.shared.schema import EncryptedBlock, UpdateChunk
from fedmq.shared.signing import (
    generate_aggregator_key,
    generate_site_key,
    load_pinned_keys,
    load_private_key,
    load_public_key,
    sign,
    sign_chunk,
    signing_payload,
    verify,
    verify_chunk,
)


def _chunk(**changes: object) -> UpdateChunk:
    fields = dict(
        chunk_index=0, chunk_count=2, block_size=2048, total_blocks=8, block_indices=(1, 3, 4),
        blocks=(EncryptedBlock(index=1, ciphertext=b"\x01" * 40), EncryptedBlock(index=3, ciphertext=b"\x02" * 40)),
        key_fingerprint="n4096-q54:0123456789abcdef", layout_fingerprint="f" * 32, site_id="site-a",
        update_id="site-a:3", seq=3, base_version=1, sample_weight=50.0, sparsity_mode="topk",
        sparsity_fraction=0.4, created_at=1.0,
    )
    fields.update(changes)
    return UpdateChunk(**fields)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("sitekeys")
    priv_a, pub_a = generate_site_key(d, "site-a")
    priv_b, _ = generate_site_key(d, "site-b")
    return d, load_private_key(priv_a), load_private_key(priv_b), load_pinned_keys(d)


def test_sign_and_verify_round_trip(keys) -> None:  # type: ignore[no-untyped-def]
    _, key_a, _, pinned = keys
    signed = sign_chunk(_chunk(), key_a)
    assert 64 + 3309 < len(signed.signature) <= 4096  # both halves
    verify_chunk(signed, pinned)
    verify_chunk(decode_update_chunk(encode(signed)), pinned)  # survives the wire
    assert signing_payload(signed) == signing_payload(_chunk())


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 4}, {"update_id": "site-a:4"}, {"sample_weight": 5000.0}, {"base_version": 0}, {"chunk_index": 1},
        {"block_indices": (1, 3, 5)}, {"blocks": (EncryptedBlock(index=1, ciphertext=b"\x01" * 40),)},
        {"blocks": (EncryptedBlock(index=1, ciphertext=b"\x01" * 39 + b"\x00"), EncryptedBlock(index=3, ciphertext=b"\x02" * 40))},
        {"key_fingerprint": "n4096-q54:ffffffffffffffff"}, {"created_at": 2.0}, {"sparsity_mode": "dense"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_altered_chunk_fails_verification(keys, change: dict) -> None:  # type: ignore[no-untyped-def]
    _, key_a, _, pinned = keys
    signed = sign_chunk(_chunk(), key_a)
    tampered = signed.model_copy(update=change)
    with pytest.raises(SignatureInvalid) as info:
        verify_chunk(tampered, pinned)
    assert info.value.reason == "bad-signature"


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x00" * 63, b"\x00" * 65], ids=["empty", "zeros", "short", "long"])
def test_bad_signature_bytes(keys, signature: bytes) -> None:  # type: ignore[no-untyped-def]
    _, _, _, pinned = keys
    with pytest.raises(SignatureInvalid):
        verify_chunk(_chunk(signature=signature), pinned)


def test_signature_by_another_site_is_invalid(keys) -> None:  # type: ignore[no-untyped-def]
    _, _, key_b, pinned = keys
    with pytest.raises(SignatureInvalid):
        verify_chunk(sign_chunk(_chunk(), key_b), pinned)  # site-b signing as site-a


def test_unknown_site(keys) -> None:  # type: ignore[no-untyped-def]
    _, key_a, _, pinned = keys
    with pytest.raises(UnknownSite) as info:
        verify_chunk(sign_chunk(_chunk(site_id="site-z"), key_a), pinned)
    assert info.value.reason == "unknown-site"


def test_key_files(keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d, _, _, pinned = keys
    assert sorted(pinned) == ["site-a", "site-b"]
    assert stat.S_IMODE((d / "site-a.hybrid").stat().st_mode) == 0o600
    with pytest.raises(ConfigError):
        generate_site_key(d, "site-a")  # refuses to overwrite an identity
    with pytest.raises(ConfigError):
        generate_site_key(tmp_path, "Bad Site")
    with pytest.raises(ConfigError):
        load_public_key(d / "site-a.hybrid")  # a private key is not a public key
    with pytest.raises(ConfigError):
        load_private_key(tmp_path / "missing.hybrid")


def _strip(signature: bytes, half: str) -> bytes:
    obj = msgpack.unpackb(signature, raw=False)
    del obj[half]
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    ("half", "message"),
    [("ml-dsa-65", "ML-DSA-65 signature missing"), ("ed25519", "Ed25519 signature missing")],
)
def test_one_half_missing_is_refused(keys, half: str, message: str) -> None:  # type: ignore[no-untyped-def]
    """A downgrade: the other half is valid, yet the chunk is refused, naming the missing half."""
    _, key_a, _, pinned = keys
    signed = sign_chunk(_chunk(), key_a)
    with pytest.raises(SignatureInvalid, match=message):
        verify_chunk(signed.model_copy(update={"signature": _strip(signed.signature, half)}), pinned)


@pytest.mark.parametrize("half", ["ed25519", "ml-dsa-65"])
def test_one_half_from_another_key_is_refused(keys, half: str) -> None:  # type: ignore[no-untyped-def]
    _, key_a, key_b, pinned = keys
    good = msgpack.unpackb(sign_chunk(_chunk(), key_a).signature, raw=False)
    bad = msgpack.unpackb(sign_chunk(_chunk(), key_b).signature, raw=False)
    mixed = msgpack.packb({**good, half: bad[half]}, use_bin_type=True)
    name = "Ed25519" if half == "ed25519" else "ML-DSA-65"
    with pytest.raises(SignatureInvalid, match=f"{name} signature does not verify"):
        verify_chunk(_chunk(signature=mixed), pinned)


def test_domains_are_separated(keys) -> None:  # type: ignore[no-untyped-def]
    """An update signature cannot pass as a version or audit-record signature of the same bytes."""
    _, key_a, _, pinned = keys
    payload = b"same bytes"
    sig = sign(key_a, "update-chunk", payload)
    verify(pinned["site-a"], "update-chunk", payload, sig)
    for other in ("global-version", "audit-record"):
        with pytest.raises(SignatureInvalid):
            verify(pinned["site-a"], other, payload, sig)


def test_legacy_ed25519_only_key_is_refused_clearly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    old = tmp_path / "site-a.ed25519"
    old.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="Ed25519-only key"):
        load_private_key(old)


def test_aggregator_key_is_not_a_site(tmp_path) -> None:  # type: ignore[no-untyped-def]
    generate_aggregator_key(tmp_path)
    generate_site_key(tmp_path, "site-a")
    assert sorted(load_pinned_keys(tmp_path)) == ["site-a"]
    assert load_public_key(tmp_path / "aggregator.hybrid.pub").fingerprint == load_private_key(
        tmp_path / "aggregator.hybrid").public_key().fingerprint
