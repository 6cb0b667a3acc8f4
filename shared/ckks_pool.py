"""Encryption on every core: a pool of key-holding worker processes.

``tenseal.sealapi`` keeps the GIL while SEAL encodes and encrypts, so threads do not help
(two threads: 0.98x of one, measured on this project's 2-core machine); processes do.

The workers are plain subprocesses (``python -m fedmq.shared.ckks_pool KEYFILE``) speaking a tiny
length-prefixed protocol over their pipes, not ``multiprocessing``: spawn and forkserver
re-import the caller's ``__main__`` in every worker (a script without a main guard would
recurse), and fork would copy a site agent's training and broker threads mid-flight. Each
worker loads the secret key file once (the path travels, never the key bytes) and encrypts
batches of blocks sent as float64 rows (written straight from the array, no copy) and answers
with the batch's ciphertexts back to back in one write (they all have the seeded size); one
thread per worker in the caller writes a batch and reads its ciphertexts, so the pipes never
deadlock. Workers range-check each batch as the serial path does; a refused batch leaves the
worker running. Small updates stay in the calling process,
where a round trip would cost more than it saves.
"""

from __future__ import annotations

import atexit
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np

from fedmq.shared.ckks import LoadedContext, encrypt_blocks, load_context
from fedmq.shared.errors import CryptoError

#: below this many blocks an update is encrypted in the calling process
MIN_PARALLEL_BLOCKS = 64
#: blocks per batch: large enough to amortize the pipe round trip, small enough to balance the cores
BATCH_BLOCKS = 32

_BATCH_HEAD = struct.Struct("<II")  # rows, columns (float64 values follow, row-major)
_LEN = struct.Struct("<I")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Refused(CryptoError):
    """A worker refused a batch (a value out of range); the worker itself is fine."""


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if data is None or len(data) != n:
        raise EOFError(f"expected {n} bytes, got {0 if data is None else len(data)}")
    return data


class _Worker:
    def __init__(self, key_path: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.shared.ckks_pool", key_path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )

    def encrypt(self, batch: np.ndarray) -> list[bytes]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:
            raise CryptoError("encryption worker has no pipes")
        try:
            rows, cols = batch.shape
            stdin.write(_BATCH_HEAD.pack(rows, cols))
            stdin.write(memoryview(np.ascontiguousarray(batch, dtype="<f8")).cast("B"))  # no copy
            stdin.flush()
            (status,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
            if status == 0xFFFFFFFF:  # the worker refused the batch: its message follows
                (n,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
                raise _Refused(_read_exact(stdout, n).decode(errors="replace"))
            (size,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
            data = _read_exact(stdout, status * size)  # the ciphertexts, all of one size, back to back
            return [data[i * size : (i + 1) * size] for i in range(status)]
        except (OSError, EOFError, ValueError) as exc:
            raise CryptoError(f"encryption worker {self.proc.pid} failed ({exc})") from None

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class EncryptionPool:
    """``workers`` key-holding processes; ``encrypt`` keeps the blocks' order."""

    def __init__(self, key_path: str | Path, workers: int) -> None:
        self.key_path = str(key_path)
        self.workers = [_Worker(self.key_path) for _ in range(workers)]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for w in self.workers:
            self._idle.put(w)
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedmq-encrypt")

    def _run(self, batch: np.ndarray) -> list[bytes]:
        worker = self._idle.get()
        try:
            return worker.encrypt(batch)
        finally:
            self._idle.put(worker)

    def encrypt(self, blocks: np.ndarray) -> list[bytes]:
        """``blocks``: (n, <= block_size) float64, one row a block."""
        return [ct for batch in self.iter_encrypt(blocks) for ct in batch]

    def iter_encrypt(self, blocks: np.ndarray) -> Iterator[list[bytes]]:
        """The ciphertexts of ``blocks`` batch by batch, in order, each as soon as it is ready
        (the caller chunks and signs the first ones while the workers encrypt the rest). The
        work starts at this call, not at the first ``next``."""
        futures = [self._threads.submit(self._run, blocks[start : start + BATCH_BLOCKS])
                   for start in range(0, len(blocks), BATCH_BLOCKS)]
        return self._results(futures)

    @staticmethod
    def _results(futures: list[Future[list[bytes]]]) -> Iterator[list[bytes]]:
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:  # a caller that stops early leaves no batch queued
                f.cancel()

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for w in self.workers:
            w.close()


_pools: dict[tuple[str, int], EncryptionPool] = {}
_pools_lock = threading.Lock()


def _pool_for(ctx: LoadedContext, workers: int) -> EncryptionPool | None:
    if ctx.source is None:
        return None
    key = (str(ctx.source), workers)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = EncryptionPool(ctx.source, workers)
        return pool


def encrypt_blocks_parallel(ctx: LoadedContext, blocks: np.ndarray, *, workers: int | None = None) -> list[bytes]:
    """Encrypt the rows of ``blocks`` (n, <= block_size) on ``workers`` processes (default: every
    core this process may use), in order."""
    return [ct for batch in iter_encrypt_blocks(ctx, blocks, workers=workers) for ct in batch]


def iter_encrypt_blocks(ctx: LoadedContext, blocks: np.ndarray, *, workers: int | None = None) -> Iterator[list[bytes]]:
    """``encrypt_blocks_parallel`` batch by batch: lists of ciphertexts, in order, each yielded
    as soon as it is ready. The workers start at this call, so the caller can prepare while they
    run; small updates are encrypted in this process, batch by batch as they are taken."""
    blocks = np.asarray(blocks, dtype=np.float64)
    n = default_workers() if workers is None else max(1, workers)
    pool = _pool_for(ctx, n) if n > 1 and len(blocks) >= MIN_PARALLEL_BLOCKS else None
    if pool is None:
        return (
            [row.tobytes() for row in encrypt_blocks(ctx, blocks[start : start + BATCH_BLOCKS])]
            for start in range(0, len(blocks), BATCH_BLOCKS)
        )
    return _pool_results(ctx, n, pool, pool.iter_encrypt(blocks))


def _pool_results(ctx: LoadedContext, n: int, pool: EncryptionPool, results: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
    try:
        yield from results
    except _Refused as exc:  # out-of-range values: the workers range-check as the serial path does
        raise CryptoError(str(exc)) from None
    except CryptoError:
        with _pools_lock:  # a broken pool is replaced on the next call
            if _pools.get((str(ctx.source), n)) is pool:
                del _pools[(str(ctx.source), n)]
        pool.close()
        raise


def workers_cpu_seconds() -> float | None:
    """CPU seconds (user + system) the live encryption workers have used so far, or None where
    /proc is missing: benchmarks report it beside wall time, which other jobs on the machine inflate."""
    with _pools_lock:
        pids = [w.proc.pid for p in _pools.values() for w in p.workers]
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return total


def shutdown_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


atexit.register(shutdown_pools)


def _serve(key_path: str) -> int:
    """Worker main loop: batches in on stdin, ciphertexts out on stdout, until stdin closes."""
    ctx = load_context(key_path, require_secret=True)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_BATCH_HEAD.size)
        if not head:
            return 0
        rows, cols = _BATCH_HEAD.unpack(head)
        batch = np.frombuffer(_read_exact(stdin, rows * cols * 8), dtype="<f8").reshape(rows, cols)
        try:
            cts = encrypt_blocks(ctx, batch)
        except (CryptoError, ValueError) as exc:
            msg = str(exc).encode()
            stdout.write(_LEN.pack(0xFFFFFFFF) + _LEN.pack(len(msg)) + msg)
            stdout.flush()
            continue
        stdout.write(_LEN.pack(cts.shape[0]) + _LEN.pack(cts.shape[1]))
        stdout.write(memoryview(cts).cast("B"))
        stdout.flush()


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1]))
