"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

Every piece of state that must survive kill -9 (ledgers, checkpoints, site state) is written
through here, so a reader sees either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write_stream(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *,
                        durable: bool = True) -> Path:
    """``write(fh)`` into a temp file beside ``path``, then fsync, rename and fsync the directory.
    Streamed: a large file (a ResNet-50-size checkpoint) is never built as one buffer first.

    ``durable=False`` skips both fsyncs, for files that are only a view of durable state and
    are rewritten from it (the aggregator's status.json): readers still see the old or the new
    file, never half of one; after a power loss the file may be old or empty until rewritten."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    atomic_write_stream(path, lambda fh: fh.write(data), durable=durable)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode(), durable=durable)
