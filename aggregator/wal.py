"""Write-ahead log: length + CRC32 framed msgpack records, fsynced before a message is acked.

Frame: ``b"FW" | u32 length | u32 crc32(payload) | payload``. A reader stops at the first
frame that is short or fails its CRC (a torn write from a crash) and reports where, so the
writer can truncate the tail before appending again.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from fedmq.shared.atomic import fsync_dir

_MAGIC = b"FW"
_HEADER = struct.Struct(">2sII")
MAX_RECORD = 256 << 20


def encode_record(record: dict[str, Any]) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class FramedBody:
    """A record's large ``body`` field (a chunk of up to 4 MB), with its msgpack framing and
    CRC computed ahead: on the thread that checks the chunk, not the one that logs and folds,
    and without copying the body into one payload buffer (``frame_parts``)."""

    head: bytes  # the map header (``entries`` pairs), the key "body", the bin header
    body: bytes
    crc: int  # crc32 of head + body
    entries: int


def _bin_header(n: int) -> bytes:
    """msgpack's bin 8/16/32 header (the Packer has no method for it)."""
    if n < 1 << 8:
        return struct.pack(">BB", 0xC4, n)
    if n < 1 << 16:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def frame_body(body: bytes, entries: int) -> FramedBody:
    """Framing for a record of ``entries`` fields whose first field is ``body``."""
    packer = msgpack.Packer(use_bin_type=True)
    head = packer.pack_map_header(entries) + packer.pack("body") + _bin_header(len(body))
    return FramedBody(head, body, zlib.crc32(body, zlib.crc32(head)), entries)


def frame_parts(record: dict[str, Any], framed: FramedBody) -> list[bytes]:
    """The frame of ``record`` (whose first field is ``framed.body``) as parts to write in
    order: the same bytes ``encode_record`` gives, the body never copied."""
    keys = list(record)
    if len(keys) != framed.entries or keys[0] != "body" or record["body"] is not framed.body:
        raise ValueError("record does not start with the framed body or has another number of fields")
    packer = msgpack.Packer(use_bin_type=True)
    rest = b"".join(packer.pack(k) + packer.pack(record[k]) for k in keys[1:])
    length = len(framed.head) + len(framed.body) + len(rest)
    return [_HEADER.pack(_MAGIC, length, zlib.crc32(rest, framed.crc)), framed.head, framed.body, rest]


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], int, bool]:
    """(records, offset of the end of the last good record, torn tail present?)."""
    p = Path(path)
    if not p.exists():
        return [], 0, False
    data = p.read_bytes()
    records: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < _HEADER.size:
            return records, pos, True
        magic, length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if magic != _MAGIC or length > MAX_RECORD or start + length > len(data):
            return records, pos, True
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            return records, pos, True
        try:
            rec = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:
            return records, pos, True
        records.append(rec)
        pos = start + length
    return records, pos, False


class WalSyncFailed(RuntimeError):
    """A group fsync failed: the aggregator must stop rather than ack (``WriteAheadLog.sync``)."""


def _reopen_truncated(fh: Any, path: Path, size: int) -> Any:
    try:
        fh.close()
    except OSError:
        pass  # the buffered tail could not be flushed: it is being cut off anyway
    out = open(path, "ab")
    out.truncate(size)
    out.flush()
    os.fsync(out.fileno())
    return out


class WriteAheadLog:
    """One open segment file, appended to and fsynced record by record."""

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, good_end, torn = read_records(self.path)
        existed = self.path.exists()
        self._fh = open(self.path, "ab")
        if torn:
            self._fh.truncate(good_end)
            self._sync()
        if not existed:
            fsync_dir(self.path.parent)
        self.bytes_written = 0

    def _sync(self) -> None:
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())

    def append(self, record: dict[str, Any], framed: FramedBody | None = None, *, sync: bool = True) -> None:
        """``framed``: the record's body framed ahead (``frame_body``). ``sync=False``: written
        to the OS but durable only after the next ``sync()`` (group commit)."""
        frames = frame_parts(record, framed) if framed is not None else [encode_record(record)]
        self.append_encoded(frames, sync=sync)
        self.bytes_written += sum(len(f) for f in frames)

    def append_encoded(self, frames: list[bytes], *, sync: bool = True) -> None:
        """All frames written (durable, with ``sync``), or none: a failed write (disk full) is
        cut off again.

        Without the rewind a half-written frame would sit in front of records written after
        the disk recovers, and replay stops at the first bad frame: those later records, acked
        already, would be lost. If even the rewind fails the error propagates and the service
        stops rather than ack anything more.
        """
        start = self._fh.tell()
        try:
            for f in frames:
                self._fh.write(f)
            if sync:
                self._sync()
            else:
                self._fh.flush()
        except OSError:
            self._fh = _reopen_truncated(self._fh, self.path, start)
            raise

    def sync(self) -> None:
        """Make every record appended so far durable (one fsync for a group of them).

        A failure here cannot be cut off like a failed write: the records since the last sync
        may or may not be on disk, and the caller may already hold their effects in memory. It
        raises ``WalSyncFailed``, which the aggregator service does not survive: a restart
        rebuilds its state from what is durable, and none of those records was acked."""
        try:
            self._sync()
        except OSError as exc:
            raise WalSyncFailed(f"fsync of {self.path} failed: {exc}") from exc

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(read_records(self.path)[0])


def write_segment(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Create a segment holding ``records`` atomically (temp, fsync, rename, fsync dir)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as fh:
        for r in records:
            fh.write(encode_record(r))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    fsync_dir(p.parent)
