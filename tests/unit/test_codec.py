"""fedmq.shared.codec: every message kind round-trips; every malformed input gets its own error."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmq.shared import codec
from fedmq.shared.errors import (
    MalformedMessage,
    MessageTooLarge,
    SchemaVersionMismatch,
    SchemaViolation,
    TruncatedMessage,
    UnknownMessageKind,
    WireError,
)
from fedmq.shared.schema import (
    MESSAGE_TYPES,
    AuditContribution,
    AuditEpsilon,
    AuditRecord,
    Contributor,
    EncryptedBlock,
    GlobalVersionChunk,
    Rejection,
    SiteMetrics,
    SnapshotRequest,
    UpdateChunk,
)

HSETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

site_ids = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
update_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,30}", fullmatch=True)
fingerprints = st.text(min_size=8, max_size=80)
finite = st.floats(allow_nan=False, allow_infinity=False)
versions = st.integers(min_value=0, max_value=2**40)


@st.composite
def chunk_fields(draw: st.DrawFn) -> dict:
    total = draw(st.integers(min_value=1, max_value=64))
    indices = tuple(sorted(draw(st.sets(st.integers(0, total - 1), max_size=total))))
    carried = [i for i in indices if draw(st.booleans())]
    blocks = tuple(EncryptedBlock(index=i, ciphertext=draw(st.binary(min_size=1, max_size=40))) for i in carried)
    count = draw(st.integers(min_value=1, max_value=8))
    return dict(
        chunk_index=draw(st.integers(0, count - 1)),
        chunk_count=count,
        block_size=draw(st.integers(1, 1 << 16)),
        total_blocks=total,
        block_indices=indices,
        blocks=blocks,
        key_fingerprint=draw(fingerprints),
        layout_fingerprint=draw(fingerprints),
    )


@st.composite
def update_chunks(draw: st.DrawFn) -> UpdateChunk:
    return UpdateChunk(
        **draw(chunk_fields()),
        site_id=draw(site_ids),
        update_id=draw(update_ids),
        seq=draw(st.integers(1, 2**40)),
        base_version=draw(versions),
        sample_weight=draw(st.floats(min_value=1e-6, max_value=1e9)),
        sparsity_mode=draw(st.sampled_from(["dense", "topk"])),
        sparsity_fraction=draw(st.floats(min_value=1e-3, max_value=1.0)),
        created_at=draw(finite),
        signature=draw(st.binary(max_size=64)),
    )


contributors = st.builds(
    Contributor,
    site_id=site_ids,
    update_id=update_ids,
    base_version=versions,
    staleness=st.integers(0, 1000),
    weight_units=st.integers(1, 1 << 20),
    sample_weight=finite,
)


@st.composite
def global_versions(draw: st.DrawFn) -> GlobalVersionChunk:
    return GlobalVersionChunk(
        **draw(chunk_fields()),
        version=draw(versions),
        mode=draw(st.sampled_from(["delta", "snapshot"])),
        value_scale=draw(finite),
        target_site=draw(st.none() | site_ids),
        contributors=tuple(draw(st.lists(contributors, max_size=4))),
        weight_units_sum=draw(st.integers(0, 1 << 30)),
        created_at=draw(finite),
    )


snapshot_requests = st.builds(
    SnapshotRequest, site_id=site_ids, have_version=st.integers(-1, 2**40), reason=st.text(max_size=200)
)
rejections = st.builds(
    Rejection,
    reason=st.text(max_size=64),
    detail=st.text(max_size=2000),
    site_id=st.none() | st.text(max_size=20),
    update_id=st.none() | st.text(max_size=20),
)
site_metrics = st.builds(
    SiteMetrics,
    site_id=site_ids,
    version=versions,
    auc=st.none() | st.floats(0, 1),
    n_val=st.integers(0, 10**6),
    epsilon_spent=st.floats(0, 100),
    epsilon_target=st.none() | st.floats(0, 100),
    updates_sent=st.integers(0, 10**6),
    timestamp=finite,
)
hex_digests = st.binary(min_size=32, max_size=32).map(bytes.hex)
audit_records = st.builds(
    AuditRecord,
    version=st.integers(1, 2**40),
    prev_hash=hex_digests,
    signer=st.just("0123456789abcdef"),
    contributions=st.lists(st.builds(
        AuditContribution, site_id=site_ids, update_id=st.just("site-a:1"), ciphertext_digest=hex_digests,
        base_version=versions, staleness=st.integers(0, 100), weight_units=st.integers(1, 1 << 20),
    ), max_size=4).map(tuple),
    epsilons=st.lists(st.builds(
        AuditEpsilon, site_id=site_ids, epsilon_spent=st.floats(0, 100),
        epsilon_target=st.none() | st.floats(0, 100), reported_at_version=versions,
    ), max_size=4).map(tuple),
    weight_units_sum=st.integers(0, 1 << 30),
    created_at=finite,
    signature=st.binary(max_size=64),
)

ALL_MESSAGES = {
    "update-chunk": (update_chunks(), codec.encode_update_chunk, codec.decode_update_chunk),
    "global-version": (global_versions(), codec.encode_global_version, codec.decode_global_version),
    "snapshot-request": (snapshot_requests, codec.encode_snapshot_request, codec.decode_snapshot_request),
    "rejection": (rejections, codec.encode_rejection, codec.decode_rejection),
    "site-metrics": (site_metrics, codec.encode_site_metrics, codec.decode_site_metrics),
    "audit-record": (audit_records, codec.encode,
                     lambda data, max_bytes: codec.decode(data, max_bytes=max_bytes, expect=AuditRecord)),
}


def test_every_message_kind_has_a_round_trip_test() -> None:
    assert set(ALL_MESSAGES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", sorted(ALL_MESSAGES))
def test_round_trip(kind: str) -> None:
    strategy, enc, dec = ALL_MESSAGES[kind]

    @HSETTINGS
    @given(strategy)
    def check(msg) -> None:  # type: ignore[no-untyped-def]
        data = enc(msg)
        assert isinstance(data, bytes)
        assert dec(data, max_bytes=len(data)) == msg
        generic = codec.decode(data)
        assert generic == msg and type(generic) is MESSAGE_TYPES[kind]
        assert codec.encode(generic) == data  # canonical: re-encoding is byte-identical

    check()


# --- malformed inputs: one specific error per kind -------------------------------------------

def _rejection() -> dict:
    return Rejection(reason="schema", detail="d", site_id="a").model_dump()


def _update() -> dict:
    return UpdateChunk(
        chunk_index=0, chunk_count=1, block_size=2048, total_blocks=4, block_indices=(0, 2),
        blocks=(EncryptedBlock(index=0, ciphertext=b"\x01\x02"),), key_fingerprint="k" * 16,
        layout_fingerprint="l" * 16, site_id="site-a", update_id="site-a:1", seq=1, base_version=0,
        sample_weight=10.0, sparsity_mode="topk", sparsity_fraction=0.5, created_at=1.0,
    ).model_dump()


def _pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _with(base: dict, **changes: object) -> bytes:
    return _pack({**base, **changes})


def _without(base: dict, field: str) -> bytes:
    return _pack({k: v for k, v in base.items() if k != field})


MALFORMED = [
    # (id, bytes, max_bytes, expected error)
    ("empty", b"", None, TruncatedMessage),
    ("truncated-update", codec.encode(UpdateChunk.model_validate(_update()))[:-3], None, TruncatedMessage),
    ("truncated-half", codec.encode(Rejection.model_validate(_rejection()))[:10], None, TruncatedMessage),
    ("truncated-length-header", b"\xdf\xff\xff\xff\xff", None, TruncatedMessage),
    ("garbage-byte", b"\xc1", None, MalformedMessage),
    ("garbage-text", b"hello world", None, MalformedMessage),
    ("trailing-bytes", _pack(_rejection()) + b"\x00", None, MalformedMessage),
    ("top-level-array", _pack([1, 2, 3]), None, MalformedMessage),
    ("top-level-int", _pack(7), None, MalformedMessage),
    ("top-level-str", _pack("rejection"), None, MalformedMessage),
    ("int-map-key", _pack({1: "x", "kind": "rejection"}), None, MalformedMessage),
    ("bad-utf8", b"\x81\xa4kind\xa2\xff\xfe", None, MalformedMessage),
    ("ext-type", _with(_rejection(), detail=msgpack.ExtType(5, b"ab")), None, MalformedMessage),
    ("ext-type-nested", _with(_update(), blocks=({"index": 0, "ciphertext": msgpack.ExtType(1, b"x")},)), None, MalformedMessage),
    ("ext-timestamp", msgpack.packb({**_rejection(), "site_id": msgpack.Timestamp(1, 0)}, datetime=False), None, MalformedMessage),
    ("oversize", _pack(_rejection()), 8, MessageTooLarge),
    ("wrong-type-int-for-str", _with(_update(), site_id=5), None, SchemaViolation),
    ("wrong-type-bytes-for-str", _with(_update(), site_id=b"site-a"), None, SchemaViolation),
    ("wrong-type-str-for-bytes", _with(_update(), blocks=({"index": 0, "ciphertext": "abc"},)), None, SchemaViolation),
    ("wrong-type-str-for-int", _with(_update(), seq="1"), None, SchemaViolation),
    ("wrong-type-float-for-int", _with(_update(), seq=1.0), None, SchemaViolation),
    ("out-of-range", _with(_update(), seq=0), None, SchemaViolation),
    ("nan-weight", _with(_update(), sample_weight=float("nan")), None, SchemaViolation),
    ("bad-site-id-pattern", _with(_update(), site_id="Site A"), None, SchemaViolation),
    ("unsorted-indices", _with(_update(), block_indices=(2, 0)), None, SchemaViolation),
    ("index-beyond-total", _with(_update(), block_indices=(0, 9)), None, SchemaViolation),
    ("unknown-field", _with(_update(), extra_field=1), None, SchemaViolation),
    ("unknown-nested-field", _with(_update(), blocks=({"index": 0, "ciphertext": b"x", "iv": b""},)), None, SchemaViolation),
    ("bytes-map-key", _pack({**_rejection(), b"site_id": "a"}), None, SchemaViolation),
    ("missing-field", _without(_update(), "seq"), None, SchemaViolation),
    ("missing-field-rejection", _without(_rejection(), "detail"), None, SchemaViolation),
    ("schema-version-2", _with(_update(), schema_version=2), None, SchemaVersionMismatch),
    ("schema-version-0", _with(_rejection(), schema_version=0), None, SchemaVersionMismatch),
    ("schema-version-missing", _without(_rejection(), "schema_version"), None, SchemaVersionMismatch),
    ("schema-version-str", _with(_rejection(), schema_version="1"), None, SchemaVersionMismatch),
    ("schema-version-bool", _with(_rejection(), schema_version=True), None, SchemaVersionMismatch),
    ("schema-version-float", _with(_rejection(), schema_version=1.0), None, SchemaVersionMismatch),
    ("unknown-kind", _with(_rejection(), kind="model-weights"), None, UnknownMessageKind),
    ("missing-kind", _without(_rejection(), "kind"), None, UnknownMessageKind),
    ("kind-not-str", _with(_rejection(), kind=3), None, UnknownMessageKind),
    ("snapshot-site-id-int", _pack({"schema_version": 1, "kind": "snapshot-request", "site_id": 5, "have_version": 0, "reason": "r"}), None, SchemaViolation),
]


@pytest.mark.parametrize(("data", "max_bytes", "error"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_input_gets_its_specific_error(data: bytes, max_bytes: int | None, error: type[WireError]) -> None:
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with pytest.raises(WireError) as info:
        codec.decode(data, **kwargs)
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert info.value.reason == error.reason


def test_every_truncation_of_a_valid_message_is_truncated() -> None:
    data = codec.encode(UpdateChunk.model_validate(_update()))
    for cut in range(1, len(data)):
        with pytest.raises(TruncatedMessage):
            codec.decode(data[:cut])


def test_oversize_is_refused_before_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpackb must not run on an oversize message")

    monkeypatch.setattr(codec.msgpack, "unpackb", boom)
    data = b"\xc1" * 100  # not even msgpack: the size check must come first
    with pytest.raises(MessageTooLarge):
        codec.decode(data, max_bytes=99)


def test_size_limit_is_inclusive() -> None:
    data = codec.encode(Rejection.model_validate(_rejection()))
    assert codec.decode(data, max_bytes=len(data)).kind == "rejection"
    with pytest.raises(MessageTooLarge):
        codec.decode(data, max_bytes=len(data) - 1)


def test_small_message_decoders_have_small_default_limits() -> None:
    assert len(codec.encode(Rejection(reason="x", detail="d" * 2000))) < 64 * 1024
    huge = _with(_rejection(), detail="d" * (70 * 1024))
    with pytest.raises(MessageTooLarge):
        codec.decode_rejection(huge)


def test_not_bytes_is_malformed() -> None:
    with pytest.raises(MalformedMessage):
        codec.decode("a string")  # type: ignore[arg-type]


def test_expected_kind_is_enforced() -> None:
    data = codec.encode(Rejection.model_validate(_rejection()))
    with pytest.raises(UnknownMessageKind):
        codec.decode_update_chunk(data)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = codec.encode(Rejection.model_validate(_rejection()))
    assert codec.decode(bytearray(data)) == codec.decode(memoryview(data))
