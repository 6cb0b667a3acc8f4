"""Privacy at ResNet-50 scale (issue 13): one dense update of the model's size, end to end.

* site build: the site pipeline (``build_update``: sparsify, encrypt on every core, chunk, sign)
  on a dense delta of ``params`` values, after one small update has warmed the worker pool;
  with the CPU seconds of the site process and of the encryption workers beside the wall time
  (on a shared machine the wall time depends on the other jobs; CPU seconds much less);
* floor: deserialize + fold of the same ciphertexts alone, in this process (weight 1);
* aggregator end to end: a real aggregator *process* (``python -m fedmq.aggregator``), consuming and
  then SIGSTOPped while the update is published, timed from SIGCONT until its status says the
  update is folded (K = 2: no commit) and, in a second run, until version 1 is committed,
  checkpointed and published (K = 1); its peak RSS (VmHWM, its commit workers' added) is read
  before it is stopped.

    python -m benchmarks.resnet50 [--params N]     # prints JSON

The keys it returns are merged into ``benchmarks/results/latest.json`` by ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.site_agent.models import PRESETS

#: the parameter count of the model preset (the one registry, ``site_agent.models.PRESETS``)
RESNET50_PARAMS = PRESETS["resnet50"].n_params


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _tree_hwm(pid: int) -> int | None:
    """VmHWM of the aggregator plus that of its child processes (the commit workers): each
    peak counted in full, as if they had come at once, so the sum bounds the real peak."""
    own = _vm_hwm(pid)
    if own is None:
        return None
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return own + sum(_vm_hwm(c) or 0 for c in children)


def _status(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _aggregator_run(keys: Any, url: str, state: Path, bodies: list[bytes], K: int, done: Callable[[dict[str, Any]], bool],
                    timeout: float) -> tuple[float, int | None]:
    from benchmarks.harness import consumers, declare_all, publish, spawn_shard, wait_for
    from fedmq.broker.topology import updates_queue

    declare_all(url, 1)
    proc = spawn_shard(keys, url, state, 0, 1, K)
    try:
        wait_for(lambda: consumers(url, updates_queue(0)) >= 1, 120, "aggregator consuming")
        os.kill(proc.pid, signal.SIGSTOP)
        publish(url, bodies)
        t0 = time.perf_counter()
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: done(_status(state)), timeout, "aggregator folding")
        seconds = time.perf_counter() - t0
        return seconds, _tree_hwm(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def resnet50_scale(urls: Callable[[], str], tmp: Path, *, params: int = RESNET50_PARAMS,
                   encrypt_workers: int | None = None, aggregator: bool = True) -> dict[str, Any]:
    """``aggregator=False`` (``--site-only``): the site build and the floor alone, for a host with
    no RabbitMQ (a GPU server measured for its cores); the aggregator keys are then None."""
    from fedmq.aggregator import fold as foldmod
    from benchmarks.harness import MAX_MESSAGE_BYTES, build, make_keys
    from fedmq.shared.ckks import load_ciphertext
    from fedmq.shared.ckks_pool import MIN_PARALLEL_BLOCKS, default_workers, workers_cpu_seconds
    from fedmq.shared.codec import decode_update_chunk

    keys = make_keys(tmp / "resnet50")
    rng = np.random.default_rng(50)
    block = keys.secret.block_size
    build(keys, "site-a", 1, rng.uniform(-0.5, 0.5, 2 * MIN_PARALLEL_BLOCKS * block))  # start the worker pool
    delta = rng.uniform(-0.5, 0.5, params)
    load = os.getloadavg()[0]
    workers_cpu0, cpu0 = workers_cpu_seconds(), time.process_time()
    t = time.perf_counter()
    bodies, built = build(keys, "site-a", 2, delta)
    build_s = time.perf_counter() - t
    site_cpu = time.process_time() - cpu0
    workers_cpu1 = workers_cpu_seconds()
    workers_cpu = workers_cpu1 - workers_cpu0 if workers_cpu0 is not None and workers_cpu1 is not None else None
    load_after = os.getloadavg()[0]
    del delta
    update_bytes = sum(map(len, bodies))
    blocks = len(built.sent_indices)
    folded_model_bytes = blocks * keys.public.preset.folded_bytes

    cts = [(b.index, b.ciphertext) for x in bodies for b in decode_update_chunk(x, max_bytes=MAX_MESSAGE_BYTES).blocks]
    t = time.perf_counter()
    buf: dict = {}
    for i, ct in cts:
        foldmod.fold_into(buf, [(i, load_ciphertext(keys.public, ct))], 1)
    floor_s = time.perf_counter() - t
    del buf, cts

    fold_s = version_s = rss_fold = rss_version = None
    if aggregator:
        fold_s, rss_fold = _aggregator_run(keys, urls(), tmp / "r50-fold", bodies, 2,
                                           lambda s: s.get("updates_folded_total", 0) >= 1, 900)
        version_s, rss_version = _aggregator_run(keys, urls(), tmp / "r50-version", bodies, 1,
                                                 lambda s: s.get("version", 0) >= 1, 900)
    peak = max(r for r in (rss_fold, rss_version) if r is not None) if (rss_fold or rss_version) else None
    return {
        "ckks_bytes_per_value": keys.public.preset.bytes_per_value,
        "resnet50_update_bytes": update_bytes,
        "resnet50_site_build_seconds": build_s,
        "resnet50_fold_seconds": fold_s,
        "resnet50_version_seconds": version_s,
        "resnet50_floor_seconds": floor_s,
        "resnet50_fold_vs_floor": floor_s / fold_s if fold_s else None,
        "aggregator_peak_rss_bytes": peak,
        "aggregator_peak_rss_vs_encrypted_model": (peak / folded_model_bytes) if peak else None,
        "resnet50": {
            "params": params, "blocks": blocks, "host_cpus": os.cpu_count(), "dense_fp32_bytes": 4 * params,
            "update_vs_dense_fp32": update_bytes / (4 * params), "encrypted_model_bytes": folded_model_bytes,
            "encrypt_workers": encrypt_workers or default_workers(), "encrypt_seconds": built.encrypt_seconds,
            "load_average_at_build": load, "load_average_after_build": load_after,
            "site_build_cpu_seconds": {"site_process": site_cpu, "encryption_workers": workers_cpu},
            "peak_rss_fold_run": rss_fold, "peak_rss_version_run": rss_version,
            "note": ("fold = SIGCONT to the update folded (K=2, no commit); version = SIGCONT to version 1 "
                     "committed, checkpointed and published (K=1); floor = deserialize + fold alone, one thread; "
                     "encrypted model = blocks x a folded ciphertext's bytes"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness import fresh_url, private_broker

    ap = argparse.ArgumentParser(prog="python -m benchmarks.resnet50", description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=int, default=RESNET50_PARAMS)
    ap.add_argument("--site-only", action="store_true",
                    help="site build and floor only, no broker or aggregator (a host without RabbitMQ)")
    args = ap.parse_args(argv)
    if args.site_only:
        with tempfile.TemporaryDirectory(prefix="fedmq-r50-") as tmpdir:
            out = resnet50_scale(lambda: "", Path(tmpdir), params=args.params, aggregator=False)
        print(json.dumps(out, indent=2))
        return 0
    with tempfile.TemporaryDirectory(prefix="fedmq-r50-") as tmpdir, private_broker() as node:
        os.chmod(tmpdir, 0o755)
        out = resnet50_scale(lambda: fresh_url(node), Path(tmpdir), params=args.params)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
