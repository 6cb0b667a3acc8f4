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

The same workers serve the aggregator's commit (``python -m fedmq.shared.ckks_pool --add
PARAMS``, ``AddPool``): D_v + buffer, block by block, is SEAL's save of the buffer's
ciphertext (which keeps the GIL, so it stays on the engine's thread) and then decompression,
a modular addition onto D's bytes, bit-packing and a checksum (``ckks_wire.add_full``, numpy
only). The workers do the second half on the other cores while the engine saves the next
blocks; they hold no key at all (the parameters travel as JSON) and never import TenSEAL.
"""

from __future__ import annotations

import atexit
import mmap
import os
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from fedmq.shared import ckks_wire as wire
from fedmq.shared.errors import CryptoError

if TYPE_CHECKING:
    from fedmq.shared.ckks import LoadedContext

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
    def __init__(self, args: Sequence[str]) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq.shared.ckks_pool", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )

    def call(self, parts: Sequence[bytes | memoryview], *, inline: bool = True) -> tuple[int, int, bytes]:
        """Write one batch, read its answer: (count, size of each, the ciphertexts back to back;
        ``inline=False``: they are in the worker's shared buffer instead, and this is b"")."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:
            raise CryptoError("ciphertext worker has no pipes")
        try:
            for part in parts:
                stdin.write(part)
            stdin.flush()
            (status,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
            if status == 0xFFFFFFFF:  # the worker refused the batch: its message follows
                (n,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
                raise _Refused(_read_exact(stdout, n).decode(errors="replace"))
            (size,) = _LEN.unpack(_read_exact(stdout, _LEN.size))
            return status, size, _read_exact(stdout, status * size) if inline else b""
        except (OSError, EOFError, ValueError) as exc:
            raise CryptoError(f"ciphertext worker {self.proc.pid} failed ({exc})") from None

    def close(self) -> None:
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:  # a worker that died leaves a broken pipe: nothing left to flush
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


class _Pool:
    """``workers`` processes started with ``args``; each batch goes to the next idle one."""

    def __init__(self, args: Sequence[Sequence[str]], name: str) -> None:
        self.workers = [_Worker(a) for a in args]
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for w in self.workers:
            self._idle.put(w)
        self._threads = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix=name)

    def _run(self, parts: Sequence[bytes | memoryview]) -> list[bytes]:
        worker = self._idle.get()
        try:
            count, size, data = worker.call(parts)
            return [data[i * size : (i + 1) * size] for i in range(count)]
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        self._threads.shutdown(wait=True)
        for w in self.workers:
            w.close()


#: the most (D block, buffer ciphertext) pairs one commit batch may carry
ADD_MAX_PAIRS = 32


class _Exchange:
    """A commit worker's shared buffer: a file on tmpfs (0600, in a 0700 directory) that both
    processes map, unlinked as soon as both have. The pairs go in and the sums come out through
    it; only their lengths travel over the pipe, which moved 300-400 MB/s here and so cost a
    commit as much as its additions."""

    def __init__(self, path: str, size: int, *, create: bool) -> None:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)


def _add_sizes(params: wire.WireParams) -> tuple[int, int]:
    """(bytes for one pair in, bytes for one sum out): a full ciphertext's wire size, and a SEAL
    stream's at most (its uncompressed size and headers: zstd never grows it by more)."""
    full = params.size(wire.KIND_FULL)
    return full + 16 * params.n + 1024, full


class AddPool(_Pool):
    """Commit workers: ``submit`` sends (D's bytes or None, the buffer's SEAL stream) pairs and
    answers, in order, the wire bytes of each sum (``ckks_wire.add_full``)."""

    def __init__(self, params: wire.WireParams, workers: int) -> None:
        per_in, per_out = _add_sizes(params)
        self._in_size, self._size = ADD_MAX_PAIRS * per_in, ADD_MAX_PAIRS * per_in + ADD_MAX_PAIRS * per_out
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.mkdtemp(prefix="fedmq-commit-", dir=base)
        paths = [os.path.join(self._dir, f"worker-{i}") for i in range(workers)]
        self._exchanges = {p: _Exchange(p, self._size, create=True) for p in paths}
        super().__init__([["--add", wire.params_to_json(params), p, str(self._size)] for p in paths], "fedmq-commit")
        self._by_worker = dict(zip(self.workers, self._exchanges.values(), strict=True))
        try:
            for w in self.workers:  # each says it has mapped its file: then no name is needed
                if w.proc.stdout is None or w.proc.stdout.read(1) != b"R":
                    raise CryptoError(f"commit worker {w.proc.pid} did not start")
        except BaseException:
            self.close()
            raise
        finally:  # a SIGKILLed aggregator leaves nothing on /dev/shm: the mappings die with it
            shutil.rmtree(self._dir, ignore_errors=True)

    def submit(self, pairs: Sequence[tuple[bytes | None, bytes]]) -> Future[list[bytes]]:
        if len(pairs) > ADD_MAX_PAIRS:
            raise ValueError(f"at most {ADD_MAX_PAIRS} pairs a batch")
        return self._threads.submit(self._add, pairs)

    def _add(self, pairs: Sequence[tuple[bytes | None, bytes]]) -> list[bytes]:
        worker = self._idle.get()
        try:
            mm = self._by_worker[worker].map
            off, lengths = 0, []
            for data, stream in pairs:
                for part in (data or b"", stream):
                    if off + len(part) > self._in_size:
                        raise CryptoError("commit batch larger than the workers' shared buffer")
                    mm[off : off + len(part)] = part
                    off += len(part)
                    lengths.append(len(part))
            count, size, _ = worker.call([_LEN.pack(len(pairs)), struct.pack(f"<{len(lengths)}I", *lengths)], inline=False)
            if count != len(pairs) or self._in_size + count * size > self._size:
                raise CryptoError(f"commit worker {worker.proc.pid} answered {count} sums of {size} bytes")
            base = self._in_size
            return [mm[base + i * size : base + (i + 1) * size] for i in range(count)]
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        super().close()
        for ex in self._exchanges.values():
            ex.map.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class EncryptionPool(_Pool):
    """``workers`` key-holding processes; ``encrypt`` keeps the blocks' order."""

    def __init__(self, key_path: str | Path, workers: int) -> None:
        self.key_path = str(key_path)
        super().__init__([[self.key_path]] * workers, "fedmq-encrypt")

    def _encrypt(self, batch: np.ndarray) -> list[bytes]:
        rows, cols = batch.shape
        return self._run([_BATCH_HEAD.pack(rows, cols), memoryview(np.ascontiguousarray(batch, dtype="<f8")).cast("B")])

    def encrypt(self, blocks: np.ndarray) -> list[bytes]:
        """``blocks``: (n, <= block_size) float64, one row a block."""
        return [ct for batch in self.iter_encrypt(blocks) for ct in batch]

    def iter_encrypt(self, blocks: np.ndarray) -> Iterator[list[bytes]]:
        """The ciphertexts of ``blocks`` batch by batch, in order, each as soon as it is ready
        (the caller chunks and signs the first ones while the workers encrypt the rest). The
        work starts at this call, not at the first ``next``."""
        futures = [self._threads.submit(self._encrypt, blocks[start : start + BATCH_BLOCKS])
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
    from fedmq.shared.ckks import encrypt_blocks

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


def _refuse(stdout: BinaryIO, exc: Exception) -> None:
    msg = str(exc).encode()
    stdout.write(_LEN.pack(0xFFFFFFFF) + _LEN.pack(len(msg)) + msg)
    stdout.flush()


def _serve_encrypt(key_path: str) -> int:
    """Encryption worker: batches of float64 rows in on stdin, ciphertexts out, until stdin closes."""
    from fedmq.shared.ckks import encrypt_blocks, load_context

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
            _refuse(stdout, exc)
            continue
        stdout.write(_LEN.pack(cts.shape[0]) + _LEN.pack(cts.shape[1]))
        stdout.write(memoryview(cts).cast("B"))
        stdout.flush()


def _serve_add(params_json: str, path: str, size: int) -> int:
    """Commit worker: the lengths of a batch's (D bytes, SEAL stream) pairs in on stdin, the
    pairs themselves and then the sums' wire bytes in the shared buffer at ``path``."""
    params = wire.params_from_json(params_json)
    per_in, _ = _add_sizes(params)
    in_size = ADD_MAX_PAIRS * per_in
    mm = _Exchange(path, size, create=False).map
    view = memoryview(mm)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"R")  # mapped: the caller may unlink the file now
    stdout.flush()
    while True:
        head = stdin.read(_LEN.size)
        if not head:
            return 0
        (count,) = _LEN.unpack(head)
        lengths = struct.unpack(f"<{2 * count}I", _read_exact(stdin, 8 * count))
        try:
            if sum(lengths) > in_size or count > ADD_MAX_PAIRS:
                raise CryptoError("commit batch larger than the shared buffer")
            sums, off = [], 0
            for i in range(count):
                dn, sn = lengths[2 * i], lengths[2 * i + 1]
                data = view[off : off + dn] if dn else None
                sums.append(wire.add_full(data, view[off + dn : off + dn + sn], params))
                off += dn + sn
            if len({len(x) for x in sums}) > 1:
                raise CryptoError("sums of different kinds in one batch")
        except CryptoError as exc:
            _refuse(stdout, exc)
            continue
        width = len(sums[0]) if sums else 0
        for i, x in enumerate(sums):
            mm[in_size + i * width : in_size + (i + 1) * width] = x
        stdout.write(_LEN.pack(len(sums)) + _LEN.pack(width))
        stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--add":
        sys.exit(_serve_add(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    sys.exit(_serve_encrypt(sys.argv[1]))
