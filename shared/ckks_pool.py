"""Encryption on every core: a process pool of key holders.

``tenseal.sealapi`` keeps the GIL while SEAL encodes and encrypts, so threads do not help
(two threads: 0.98x of one, measured on this project's 2-core machine); processes do. Each
worker loads the secret key file once (the path travels, never the key bytes) and encrypts
batches of blocks sent as one float64 array. Small updates stay in the calling process,
where a round trip would cost more than it saves.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from shared.ckks import LoadedContext, encrypt_block, load_context

#: below this many blocks an update is encrypted in the calling process
MIN_PARALLEL_BLOCKS = 64
#: blocks per task: large enough to amortize the pickling, small enough to balance the cores
BATCH_BLOCKS = 32

_worker_ctx: LoadedContext | None = None


def _init_worker(key_path: str) -> None:
    global _worker_ctx
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _worker_ctx = load_context(key_path, require_secret=True)


def _encrypt_batch(batch: np.ndarray) -> list[bytes]:
    if _worker_ctx is None:
        raise RuntimeError("encryption worker used before its key was loaded")
    return [encrypt_block(_worker_ctx, row) for row in batch]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class EncryptionPool:
    """A pool of worker processes holding one key; ``encrypt`` keeps the blocks' order."""

    def __init__(self, key_path: str | Path, workers: int) -> None:
        self.key_path = str(key_path)
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.key_path,),
        )

    def encrypt(self, blocks: np.ndarray) -> list[bytes]:
        """``blocks``: (n, <= block_size) float64, one row a block."""
        futures = [
            self._executor.submit(_encrypt_batch, np.ascontiguousarray(blocks[start : start + BATCH_BLOCKS]))
            for start in range(0, len(blocks), BATCH_BLOCKS)
        ]
        return [ct for f in futures for ct in f.result()]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


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
    n = default_workers() if workers is None else max(1, workers)
    pool = _pool_for(ctx, n) if n > 1 and len(blocks) >= MIN_PARALLEL_BLOCKS else None
    if pool is None:
        return [encrypt_block(ctx, b) for b in blocks]
    for b in blocks:  # refuse out-of-range values here, with the serial path's error
        if b.size and not float(np.max(np.abs(b))) <= ctx.preset.value_bound:
            encrypt_block(ctx, b)  # raises CryptoError
    return pool.encrypt(np.asarray(blocks, dtype=np.float64))


def shutdown_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for p in pools:
        p.close()


atexit.register(shutdown_pools)
