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
from pathlib import Path
from typing import Any

import msgpack

from shared.atomic import fsync_dir

_MAGIC = b"FW"
_HEADER = struct.Struct(">2sII")
MAX_RECORD = 256 << 20


def encode_record(record: dict[str, Any]) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


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

    def append(self, record: dict[str, Any]) -> None:
        frame = encode_record(record)
        self.append_encoded([frame])
        self.bytes_written += len(frame)

    def append_encoded(self, frames: list[bytes]) -> None:
        """All frames durable, or none: a failed write (disk full) is cut off again.

        Without the rewind a half-written frame would sit in front of records written after
        the disk recovers, and replay stops at the first bad frame: those later records, acked
        already, would be lost. If even the rewind fails the error propagates and the service
        stops rather than ack anything more.
        """
        start = self._fh.tell()
        try:
            for f in frames:
                self._fh.write(f)
            self._sync()
        except OSError:
            self._fh = _reopen_truncated(self._fh, self.path, start)
            raise

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
