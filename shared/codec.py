"""msgpack encoding of ``fedmq.shared.schema`` messages; decoding trusts nothing.

Order of checks on decode: size before any allocation, then msgpack structure (no ext
types, no non-string keys), then the kind and schema version, then the strict pydantic
model. Each failure is a specific ``WireError`` so the consumer can dead-letter it with a
reason; nothing here returns an arbitrary object.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import ValidationError

from fedmq.shared.errors import (
    MalformedMessage,
    MessageTooLarge,
    SchemaVersionMismatch,
    SchemaViolation,
    TruncatedMessage,
    UnknownMessageKind,
)
from fedmq.shared.schema import (
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    GlobalVersionChunk,
    Rejection,
    SiteMetrics,
    SnapshotRequest,
    UpdateChunk,
    WireModel,
)

CONTENT_TYPE = "application/x-msgpack"
#: Default cap for one message; well under RabbitMQ 4's 16 MiB default max_message_size.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

M = TypeVar("M", bound=WireModel)


def _ext_refused(code: int, data: bytes) -> Any:
    raise MalformedMessage(f"msgpack extension type {code} is not allowed")


def encode(message: WireModel) -> bytes:
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)


def _unpack(data: bytes, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedMessage(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLarge(f"{len(data)} bytes exceeds the {max_bytes}-byte limit")
    if not data:
        raise TruncatedMessage("empty message")
    try:
        obj = msgpack.unpackb(
            bytes(data), raw=False, strict_map_key=True, ext_hook=_ext_refused, timestamp=0,
            use_list=False,
        )
    except msgpack.exceptions.OutOfData:
        raise TruncatedMessage("message ends in the middle of a msgpack value") from None
    except msgpack.exceptions.ExtraData:
        raise MalformedMessage("trailing bytes after the msgpack value") from None
    except MalformedMessage:
        raise
    except (ValueError, TypeError, msgpack.exceptions.UnpackException) as exc:
        # msgpack raises ValueError for both corrupt bytes and some truncations. Its
        # max_{map,array,str,bin}_len default to len(data), so "N exceeds max_map_len(M)"
        # means a length header promises more than the message holds: a cut-off message.
        text = str(exc)
        lowered = text.lower()
        if "incomplete" in lowered or "truncat" in lowered or "exceeds max_" in lowered:
            raise TruncatedMessage(text) from None
        raise MalformedMessage(f"not msgpack: {type(exc).__name__} {text}".strip()) from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"top-level value is {type(obj).__name__}, expected a map")
    _refuse_timestamps(obj)
    return obj


def _refuse_timestamps(obj: Any) -> None:
    """msgpack decodes ext type -1 (timestamp) itself, never calling ``ext_hook``."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, msgpack.Timestamp):
            raise MalformedMessage("msgpack extension type -1 (timestamp) is not allowed")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (tuple, list)):
            stack.extend(item)


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, expect: type[M] | None = None) -> WireModel:
    obj = _unpack(data, max_bytes)
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise UnknownMessageKind(f"unknown message kind {kind!r}")
    version = obj.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:  # True == 1.0 == 1 in Python
        raise SchemaVersionMismatch(f"schema_version {version!r}; this build speaks {SCHEMA_VERSION}")
    model = MESSAGE_TYPES[kind]
    if expect is not None and model is not expect:
        raise UnknownMessageKind(f"expected {expect.__name__}, got kind {kind!r}")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise SchemaViolation(f"{kind}: {where}: {first.get('msg')} ({exc.error_count()} error(s))") from None


def encode_update_chunk(chunk: UpdateChunk) -> bytes:
    return encode(chunk)


def decode_update_chunk(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> UpdateChunk:
    return decode(data, max_bytes=max_bytes, expect=UpdateChunk)  # type: ignore[return-value]


def encode_global_version(chunk: GlobalVersionChunk) -> bytes:
    return encode(chunk)


def decode_global_version(data: bytes, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> GlobalVersionChunk:
    return decode(data, max_bytes=max_bytes, expect=GlobalVersionChunk)  # type: ignore[return-value]


def encode_snapshot_request(msg: SnapshotRequest) -> bytes:
    return encode(msg)


def decode_snapshot_request(data: bytes, max_bytes: int = 64 * 1024) -> SnapshotRequest:
    return decode(data, max_bytes=max_bytes, expect=SnapshotRequest)  # type: ignore[return-value]


def encode_rejection(msg: Rejection) -> bytes:
    return encode(msg)


def decode_rejection(data: bytes, max_bytes: int = 64 * 1024) -> Rejection:
    return decode(data, max_bytes=max_bytes, expect=Rejection)  # type: ignore[return-value]


def encode_site_metrics(msg: SiteMetrics) -> bytes:
    return encode(msg)


def decode_site_metrics(data: bytes, max_bytes: int = 64 * 1024) -> SiteMetrics:
    return decode(data, max_bytes=max_bytes, expect=SiteMetrics)  # type: ignore[return-value]
