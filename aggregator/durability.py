"""The aggregator's durable state: write-ahead log segments, checkpoints, recovery.

Files in ``state_dir``: ``checkpoint.msgpack`` (D_v and bookkeeping at the last commit, see
``aggregator.checkpoint``) and ``wal-<version>.log``, the segment the checkpoint names: every
accepted chunk since that commit (``aggregator.wal``). The rules that make a crash at any point
fold each acknowledged chunk exactly once:

- a chunk is in the WAL (fsynced) before its message is acked (``log``; with group commit,
  ``log(sync=False)`` for each chunk of a batch and one ``sync`` before any of their acks);
- a commit writes the next segment (the records of still-incomplete updates) atomically first,
  then the checkpoint that names it (``begin_segment``, ``save_checkpoint``); the old segment
  is removed only after that (``end_segment``);
- on start the checkpoint is loaded and the segment it names replayed (``start``); segments it
  does not name (left by a crash mid-commit) are removed (``open_log``).

Nothing here knows what a record means: the engine builds and replays them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedmq.aggregator import checkpoint as cpmod
from fedmq.aggregator.wal import FramedBody, WriteAheadLog, read_records, write_segment

logger = logging.getLogger(__name__)


def segment_name(version: int) -> str:
    return f"wal-{version:06d}.log"


class Durability:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        #: the segment the last checkpoint names (and the WAL appends to)
        self.segment = ""
        self._wal: WriteAheadLog | None = None
        self._old_segment: str | None = None

    # ------------------------------------------------------------------ recovery

    def load_checkpoint(self) -> cpmod.Checkpoint | None:
        return cpmod.load(self.state_dir)

    def start(self, cp: cpmod.Checkpoint | None) -> list[dict[str, Any]]:
        """The records to replay: those of the segment ``cp`` names (a fresh state dir: an
        empty first segment, which the caller's first checkpoint then names)."""
        if cp is None:
            self.segment = segment_name(0)
            write_segment(self.state_dir / self.segment, [])
        else:
            self.segment = cp.wal_segment
        records, _, torn = read_records(self.state_dir / self.segment)
        if torn:
            logger.warning("WAL %s ends in a torn record (crash during a write); ignoring it", self.segment)
        return records

    def open_log(self) -> None:
        """After replay: drop segments the checkpoint does not name, open the WAL for appends
        (a torn tail is cut off there)."""
        for p in self.state_dir.glob("wal-*.log*"):
            if p.name != self.segment:
                p.unlink(missing_ok=True)
        self._wal = WriteAheadLog(self.state_dir / self.segment)

    # ------------------------------------------------------------------ the log

    def log(self, record: dict[str, Any], framed: FramedBody | None = None, *, sync: bool = True) -> None:
        """Append one record, durable (fsync) when this returns (``framed``: its body's framing,
        computed ahead; ``aggregator.wal.frame_body``). ``sync=False`` (group commit): durable
        after the next ``sync()``; nothing of it may be acked before."""
        if self._wal is None:
            raise RuntimeError("the WAL is not open yet (open_log)")
        self._wal.append(record, framed, sync=sync)

    def sync(self) -> None:
        """One fsync for every record logged with ``sync=False`` since the last one. (Records
        logged before a commit are durable already: the commit carried them into the segment
        it wrote, or folded them into the checkpoint.)"""
        if self._wal is not None:
            self._wal.sync()

    # ------------------------------------------------------------------ commits

    def begin_segment(self, version: int, carried: list[dict[str, Any]]) -> None:
        """Write version ``version``'s segment holding ``carried`` (atomically); the checkpoint
        saved next names it."""
        self._old_segment, self.segment = self.segment, segment_name(version)
        write_segment(self.state_dir / self.segment, carried)

    def save_checkpoint(self, cp: cpmod.Checkpoint) -> None:
        cp.wal_segment = self.segment
        cpmod.save(self.state_dir, cp)

    def end_segment(self, *, reopen: bool) -> None:
        """The checkpoint names the new segment: append there from now on (``reopen``; not while
        replaying, when the WAL is not open yet) and remove the old one."""
        if reopen and self._wal is not None:
            self._wal.close()
            self._wal = WriteAheadLog(self.state_dir / self.segment)
        old, self._old_segment = self._old_segment, None
        if old is not None and old != self.segment:
            (self.state_dir / old).unlink(missing_ok=True)

    def close(self) -> None:
        if self._wal is not None:
            self._wal.close()
