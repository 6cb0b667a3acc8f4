"""One process per state directory: an exclusive ``flock`` on ``<state_dir>/.fedmq.lock``.

Two aggregators folding into one WAL, or two site agents charging one privacy ledger, corrupt
exactly the state that must never be lost. The lock is advisory, taken before anything in the
directory is read, and released by the kernel when the process dies (no stale lock after a
crash or SIGKILL). The holder's pid and command line are written into the lock file so the
refusal can say who holds it.

Within one process a second acquisition of the same directory shares the held lock (tests
re-open engines on one directory to simulate restarts); the lock is dropped when the last
holder releases it.
"""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from pathlib import Path

from fedmq.shared.errors import ConfigError

LOCK_FILE = ".fedmq.lock"

_held: dict[Path, list[int]] = {}  # resolved dir -> [fd, holders]
_guard = threading.Lock()


class StateDirLocked(ConfigError):
    """Another process holds this state directory."""


class StateDirLock:
    """Held from construction until ``release()`` (or process exit)."""

    def __init__(self, state_dir: str | Path, role: str) -> None:
        self.dir = Path(state_dir).resolve()
        self.role = role
        self._released = False
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK_FILE
        with _guard:
            entry = _held.get(self.dir)
            if entry is not None:
                entry[1] += 1
                return
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                try:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                except OSError:
                    pass
                os.close(fd)
                raise StateDirLocked(
                    f"{role} state directory {self.dir} is in use by another fedmq process"
                    f"{' (' + holder + ')' if holder else ''}; stop that process first, or give this one its own "
                    f"state_dir. Two processes on one state directory would corrupt its "
                    f"{'write-ahead log' if role == 'aggregator' else 'privacy ledger'}."
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:200]} since "
                          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode(), 0)
            _held[self.dir] = [fd, 1]

    def release(self) -> None:
        with _guard:
            if self._released:
                return
            self._released = True
            entry = _held.get(self.dir)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del _held[self.dir]
                os.close(entry[0])  # closing the descriptor drops the flock


def lock_state_dir(state_dir: str | Path, role: str) -> StateDirLock:
    return StateDirLock(state_dir, role)
