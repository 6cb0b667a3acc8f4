"""Helpers for the aggregator's tests: a tiny federation (keys, sites), simulated site updates,
a plaintext FedBuff replay to compare against, and broker-side helpers (publish with confirms,
listen to the global fanout, drain the dead-letter queue, run the aggregator in a thread).

Imported as ``integration.aggregator_helpers`` (``tests/`` is on sys.path under pytest).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.aggregator.fold import reconstruct
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.experiments.testkit import LAYOUT_FP, UpdateKit
from fedmq.shared.ckks import DEFAULT_PRESET, LoadedContext, get_preset, init_keys, load_context
from fedmq.shared.codec import decode_global_version
from fedmq.shared.schema import GlobalVersionChunk
from fedmq.shared.signing import generate_aggregator_key

SITES = ("alpha", "bravo", "charlie")
SLOTS = get_preset(DEFAULT_PRESET).block_size


class FederationKit(UpdateKit):
    """Keys and signed, encrypted updates of a small federation, without any process or broker
    (not ``experiments.federation.Federation``, which runs one): the product's test kit
    (``experiments.testkit``) with the aggregator tests' defaults."""

    def __init__(self, root: Path, sites: tuple[str, ...], n_params: int, secret: LoadedContext, public_path: Path,
                 keys_dir: Path, site_keys_dir: Path) -> None:
        super().__init__(root, secret, public_path, keys_dir, site_keys_dir)
        self.sites = sites
        self.n_params = n_params

    @property
    def total_blocks(self) -> int:
        return -(-self.n_params // SLOTS)

    def settings(self, state_dir: Path | str | None = None, **overrides: Any) -> AggregatorSettings:
        base: dict[str, Any] = dict(buffer_size=3, incomplete_timeout_s=30.0, housekeeping_s=0.2,
                                    max_message_bytes=256 * 1024)
        base.update(overrides)
        return super().settings(Path(state_dir) if state_dir else self.root / "state", **base)

    def update(  # type: ignore[override]
        self, site: str, seq: int, base_version: int, delta: np.ndarray, *,
        sample_weight: float = 1.0, mode: str = "dense", fraction: float = 0.5,
        max_message_bytes: int = 256 * 1024, layout_fp: str = LAYOUT_FP, secret: LoadedContext | None = None,
    ) -> tuple[list[bytes], dict[int, np.ndarray]]:
        """Encoded chunks of one update + the plaintext blocks actually sent (index -> values)."""
        u = super().update(site, seq, delta, base_version=base_version, sample_weight=sample_weight, mode=mode,
                           fraction=fraction, max_message_bytes=max_message_bytes, layout_fp=layout_fp, secret=secret)
        return u.bodies, u.sent

    def model(self, blocks: dict[int, bytes], value_scale: float) -> np.ndarray:
        return reconstruct(np.zeros(self.n_params), self.decrypt(blocks), value_scale, SLOTS)


def make_federation(root: Path, sites: tuple[str, ...] = SITES, n_params: int = 3 * SLOTS + 100) -> FederationKit:
    keys = init_keys(root / "keys")
    generate_aggregator_key(root / "keys")
    secret = load_context(keys.secret_context, require_secret=True)
    fed = FederationKit(root, sites, n_params, secret, keys.public_context, root / "keys", root / "site-keys")
    for s in sites:
        fed.site_key(s)
    return fed


def random_delta(rng: np.random.Generator, n: int, scale: float = 0.5) -> np.ndarray:
    return rng.uniform(-scale, scale, n)


class PlainReplay:
    """Plaintext FedBuff: D += sum over contributors of units * sent blocks, per version."""

    def __init__(self) -> None:
        self.D: dict[int, np.ndarray] = {}

    def fold(self, sent: dict[int, np.ndarray], units: int) -> None:
        for i, v in sent.items():
            self.D[i] = self.D.get(i, 0.0) + units * v

    def model(self, n: int, value_scale: float) -> np.ndarray:
        return reconstruct(np.zeros(n), self.D, value_scale, SLOTS)


# ---------------------------------------------------------------------------- broker helpers


def connect(url: str):  # type: ignore[no-untyped-def]
    import pika

    params = pika.URLParameters(url)
    params.connection_attempts = 10
    params.retry_delay = 0.5
    return pika.BlockingConnection(params)


def declare_topology(url: str, sites: tuple[str, ...] = ()) -> None:
    """What an administrator declares: exchanges, the aggregator's queues and, for ``sites``, each
    site's own queue (sites may not declare it themselves)."""
    from fedmq.broker import provision

    conn = connect(url)
    try:
        provision.declare_topology(conn.channel(), sites)
    finally:
        conn.close()


def publish(url: str, bodies: list[bytes], *, user_id: str | None = None, exchange: str | None = None,
            routing_key: str | None = None) -> None:
    """Publish with publisher confirms (returns once the broker has them all)."""
    import pika

    from fedmq.broker.topology import UPDATES_EXCHANGE, shard_key

    conn = connect(url)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for body in bodies:
            ch.basic_publish(
                exchange if exchange is not None else UPDATES_EXCHANGE,
                routing_key if routing_key is not None else shard_key(0), body,
                pika.BasicProperties(delivery_mode=2, user_id=user_id, content_type="application/x-msgpack"),
                mandatory=True,
            )
    finally:
        conn.close()


class GlobalListener:
    """A queue bound to the global fanout (and site-direct for one site); reassembles versions."""

    def __init__(self, url: str, site: str = "observer") -> None:
        from fedmq.broker.topology import EXCHANGES, GLOBAL_EXCHANGE, SITE_DIRECT_EXCHANGE, declare

        self.conn = connect(url)
        self.ch = self.conn.channel()
        declare(self.ch, EXCHANGES, ())
        self.queue = self.ch.queue_declare("", exclusive=True).method.queue
        self.ch.queue_bind(self.queue, GLOBAL_EXCHANGE, "")
        self.ch.queue_bind(self.queue, SITE_DIRECT_EXCHANGE, site)
        self._parts: dict[tuple[int, str, int], dict[int, GlobalVersionChunk]] = {}
        self.versions: list[dict[str, Any]] = []  # complete messages in arrival order

    def poll(self, timeout: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            method, _props, body = self.ch.basic_get(self.queue, auto_ack=True)
            if method is None:
                if time.monotonic() >= deadline:
                    return
                self.conn.process_data_events(time_limit=0.05)
                continue
            c = decode_global_version(body, max_bytes=64 << 20)
            key = (c.version, c.mode, int(c.created_at * 1e6))
            parts = self._parts.setdefault(key, {})
            parts[c.chunk_index] = c
            if len(parts) == c.chunk_count:
                del self._parts[key]
                blocks = {b.index: b.ciphertext for p in parts.values() for b in p.blocks}
                self.versions.append(dict(
                    version=c.version, mode=c.mode, blocks=blocks, value_scale=c.value_scale,
                    contributors=c.contributors, target_site=c.target_site, weight_units_sum=c.weight_units_sum,
                ))

    def wait_for(self, pred, timeout: float = 30.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for v in self.versions:
                if pred(v):
                    return v
            self.poll(0.2)
        raise AssertionError(f"no matching version within {timeout}s; got {[(v['version'], v['mode']) for v in self.versions]}")

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass


def drain_dead_letters(url: str, expected: int, timeout: float = 20.0) -> list[tuple[dict[str, Any], bytes]]:
    from fedmq.broker.topology import DEAD_LETTER_QUEUE

    conn = connect(url)
    out: list[tuple[dict[str, Any], bytes]] = []
    try:
        ch = conn.channel()
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            method, props, body = ch.basic_get(DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                conn.process_data_events(time_limit=0.1)
                continue
            out.append((dict(props.headers or {}), body))
    finally:
        conn.close()
    return out


class AggregatorThread:
    """The real consumer, in a thread of the test process (stop() = the SIGTERM path)."""

    def __init__(self, settings: AggregatorSettings) -> None:
        from fedmq.aggregator.consumer import AggregatorService

        self.service = AggregatorService(settings)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    def __enter__(self) -> "AggregatorThread":
        self.thread.start()
        if not self.service.ready.wait(30):
            raise AssertionError("aggregator did not connect within 30s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "aggregator did not stop"

    @property
    def engine(self):  # type: ignore[no-untyped-def]
        return self.service.engine
