"""What the benchmark sections share: keys and signed updates (the test kit,
``experiments.testkit``), aggregator settings, a private RabbitMQ node with a fresh vhost per
measurement, publishing with confirms through ``broker.transport``, aggregator threads and
processes, and the small helpers (median, waiting) every section uses.

No measurement lives here; ``benchmarks.run`` has the sections.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.experiments.testkit import UpdateKit

ROOT = Path(__file__).resolve().parents[1]
#: the chunk size the benchmarks build updates with (one chunk per few hundred blocks)
MAX_MESSAGE_BYTES = 4 << 20
LAYOUT_FP = "bench-layout-000000000001"


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def data_npz() -> Path | None:
    root = os.environ.get("FEDMQ_DATA_ROOT")
    cands = [Path(root) / "pneumoniamnist.npz"] if root else []
    cands.append(ROOT.parent / "shared" / "data" / "pneumoniamnist.npz")
    return next((p for p in cands if p.is_file()), None)


# ----------------------------------------------------------------------------- keys and updates


def make_keys(root: Path, preset: str | None = None) -> UpdateKit:
    """A federation's keys (``preset``: a CKKS preset of ``fedmq.shared.ckks.PRESETS``; None = default)."""
    return UpdateKit.create(root, preset=preset, layout_fp=LAYOUT_FP)


def build(keys: UpdateKit, site: str, seq: int, delta: np.ndarray, *, mode: str = "dense", fraction: float = 1.0,
          shard_count: int = 1, base: int = 0) -> tuple[list[bytes], Any]:
    """Encoded, signed chunks of one update (and the BuiltUpdate)."""
    u = keys.update(site, seq, delta, base_version=base, mode=mode, fraction=fraction,
                    max_message_bytes=MAX_MESSAGE_BYTES, shard_count=shard_count)
    return u.bodies, u.built


def block_wire_bytes(keys: UpdateKit) -> float:
    """Bytes one more dense block adds to an update on the wire (ciphertext plus its envelope),
    measured with the keys' own preset: the HE seam says what a ciphertext weighs, the codec
    what wraps it, and no constant here repeats either."""
    rng = np.random.default_rng(0)
    small, large = 1, 9
    sizes = [sum(map(len, build(keys, "site-size", n, rng.uniform(-0.5, 0.5, n * keys.block_size))[0]))
             for n in (small, large)]
    return (sizes[1] - sizes[0]) / (large - small)


def agg_settings(keys: UpdateKit, state_dir: Path, **kw: Any) -> Any:
    base: dict[str, Any] = dict(housekeeping_s=0.5, max_staleness=1000, max_message_bytes=MAX_MESSAGE_BYTES)
    base.update(kw)
    return keys.settings(state_dir, **base)


def engine_version_seconds(keys: UpdateKit, state_dir: Path, bodies: list[bytes], K: int) -> float:
    """The aggregator engine's own work for one version (decode, verify, WAL fsync, fold, commit +
    checkpoint, version messages), fed in-process: no broker."""
    from fedmq.aggregator.engine import AggregatorEngine

    engine = AggregatorEngine(agg_settings(keys, state_dir, buffer_size=K))
    try:
        t = time.perf_counter()
        for b in bodies:
            d, _ = engine.handle_chunk(b)
            if d.action != "accept":
                raise RuntimeError(f"bench update refused: {d.reason} {d.detail}")
        elapsed = time.perf_counter() - t
        if engine.version != 1:
            raise RuntimeError(f"the bench workload made version {engine.version}, not 1")
        return elapsed
    finally:
        engine.close()


# ----------------------------------------------------------------------------- the broker


@contextlib.contextmanager
def private_broker() -> Iterator[Any]:
    """A private RabbitMQ node (own name, ports, data dir), stopped afterwards."""
    from fedmq.broker.local_node import LocalRabbitNode

    node = LocalRabbitNode()
    with node:
        yield node


_vhost_n = 0


def fresh_url(node: Any) -> str:
    global _vhost_n
    _vhost_n += 1
    name = f"bench-{os.getpid()}-{_vhost_n}"
    node.add_vhost(name)
    node.set_permissions(name, node.username, ".*", ".*", ".*")
    return node.url_for_vhost(name)


def declare_all(url: str, shards: int = 1) -> None:
    from fedmq.broker.topology import EXCHANGES, aggregator_queue_specs
    from fedmq.broker.transport import connect_link

    link = connect_link(url)
    try:
        link.declare(EXCHANGES, aggregator_queue_specs(shards))
    finally:
        link.close()


def publish(url: str, bodies: list[bytes], shard_of: Callable[[bytes], int] | None = None) -> float:
    """Publish with confirms; returns the seconds it took."""
    from fedmq.broker.topology import UPDATES_EXCHANGE, shard_key
    from fedmq.broker.transport import Message, connect_link

    link = connect_link(url)
    try:
        t = time.perf_counter()
        for body in bodies:
            key = shard_key(shard_of(body) if shard_of else 0)
            link.publish(Message(UPDATES_EXCHANGE, key, body, mandatory=True))
        return time.perf_counter() - t
    finally:
        link.close()


def consumers(url: str, queue: str) -> int:
    from fedmq.broker.transport import connect_link

    link = connect_link(url)
    try:
        return link.consumer_count(queue)
    finally:
        link.close()


# ----------------------------------------------------------------------------- aggregators


class AggThread:
    """The real ``AggregatorService`` in a thread of this process."""

    def __init__(self, settings: Any) -> None:
        from fedmq.aggregator.consumer import AggregatorService

        self.service = AggregatorService(settings)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    def __enter__(self) -> AggThread:
        self.thread.start()
        if not self.service.ready.wait(60):
            raise RuntimeError("aggregator did not connect within 60s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(60)


def spawn_shard(keys: UpdateKit, url: str, state: Path, index: int, count: int, K: int) -> subprocess.Popen:
    """An aggregator *process* (``python -m fedmq.aggregator``) for shard ``index`` of ``count``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_CHECK_USER_ID="false", FEDMQ_LOG_JSON="false",
               FEDMQ_MAX_STALENESS="1000", FEDMQ_SNAPSHOT_EVERY="0", FEDMQ_HOUSEKEEPING_S="0.5",
               FEDMQ_LOG_LEVEL="WARNING")
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fedmq.aggregator", "--state-dir", str(state), "--amqp-url", url,
           "--public-context", str(keys.public_path), "--site-keys", str(keys.site_keys_dir),
           "--signing-key", str(keys.aggregator_key_path),
           "--buffer-size", str(K), "--shard-index", str(index), "--shard-count", str(count)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(state / "aggregator.log", "ab"), start_new_session=True)


def status_version(state: Path) -> int:
    try:
        return int(json.loads((state / "status.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return -1
