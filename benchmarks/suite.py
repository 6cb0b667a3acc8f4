"""The cost of privacy and how the aggregator scales: ``python -m benchmarks`` (``make bench``).

Every figure is the median of repeats taken in this run on this machine; every comparison is a
ratio of two figures of this run. Writes ``benchmarks/results/latest.json`` and ``latest.md``.

Sections (each a function taking a :class:`Sizes`, so the unit tests run them tiny):

- ``fold_end_to_end``: encrypted values folded per second, updates published to a private
  RabbitMQ node (``broker.local_node.LocalRabbitNode``) -> the real ``AggregatorService``
  consumer (decode, verify, WAL fsync, ack, deserialize, fold, commit + checkpoint, publish the
  version) -> folded into the global model; beside it the *floor* (deserialize + homomorphic add
  of the same ciphertexts, alone) and plaintext float32 summation of the same values.
- ``wire_bytes``: bytes on the wire per update / dense float32 bytes, default site settings,
  and a table over top-k levels x CKKS presets with the AUC cost of each (short runs of the
  in-process simulation ``experiments.simulation``: the real trainer, sparsifier and fold).
- ``site_overhead``: (sparsify + encrypt + sign + publish) / local training time, per round.
- ``scaling_sites`` / ``scaling_model``: aggregator time per version vs number of publishers
  and vs model size (random deltas of the small_cnn / resnet18 / resnet50 parameter counts).
- ``shard_speedup``: two aggregator shards (separate processes) vs one, same workload.
- ``async_vs_sync``: time to a target AUC, sync over async, with one 4x straggler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.ckks import DEFAULT_PRESET, PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
SLOTS = get_preset(DEFAULT_PRESET).block_size
MAX_MESSAGE_BYTES = 4 << 20

#: parameter counts of the model presets (site_agent.models); small_cnn is measured at run time
MODEL_PARAMS = {"resnet18": 11_170_000, "resnet50": 23_500_000}

GOALS = {
    "aggregator_vs_floor": ">= 0.5",
    "wire_bytes_ratio_vs_dense_fp32": "<= 1.0 at <= 1 AUC point of cost",
    "site_overhead_fraction": "<= 0.10",
    "shard_speedup_2": ">= 1.7 (2 cores)",
    "ckks_bytes_per_value": "<= 7.1 (goal 6.2)",
    "resnet50_site_build_seconds": "<= 5 (2 cores)",
    "resnet50_fold_seconds": "<= 5 (2 cores)",
    "aggregator_peak_rss_vs_encrypted_model": "<= 3",
}

log = logging.getLogger("benchmarks")


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs. ``full()`` for ``make bench``; ``tiny()`` for unit tests."""

    repeats: int = 3
    # fold end to end / floor
    fold_params: int = 400_000
    fold_updates: int = 6
    fold_buffer: int = 3
    # scaling
    site_counts: tuple[int, ...] = (1, 4, 16, 64)
    site_params: int = 40 * SLOTS
    model_presets: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50")
    model_topk: float = 0.12  # used where a dense update does not fit the memory budget
    memory_budget_bytes: int | None = None  # None = half of MemAvailable
    # shard speedup
    shard_params: int = 600_000
    shard_updates: int = 9
    # site overhead
    overhead_rounds: int = 3
    overhead_train_samples: int | None = None  # None = one third of the training split
    # AUC table (simulation)
    auc_levels: tuple[float, ...] = (1.0, 0.5, 0.25, 0.12)
    auc_presets: tuple[str, ...] = tuple(PRESETS)
    auc_rounds: int = 3
    auc_train_per_site: int | None = 400
    auc_seeds: tuple[int, ...] = (0,)
    # async vs sync (real federation)
    avs_time_limit_s: float = 150.0
    avs_target_auc: float = 0.90
    avs_train: int = 1500
    # privacy at ResNet-50 scale (benchmarks.resnet50)
    resnet50_params: int = 23_500_000
    skip: tuple[str, ...] = ()

    @classmethod
    def full(cls) -> "Sizes":
        return cls()

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(
            repeats=1, fold_params=4 * SLOTS, fold_updates=2, fold_buffer=2, site_counts=(1, 2), site_params=2 * SLOTS,
            model_presets=("small_cnn",), memory_budget_bytes=1 << 30, shard_params=4 * SLOTS, shard_updates=2,
            overhead_rounds=1, overhead_train_samples=64, auc_levels=(1.0, 0.5), auc_presets=(DEFAULT_PRESET,),
            auc_rounds=1, auc_train_per_site=48, avs_time_limit_s=30.0, resnet50_params=160 * SLOTS,
        )


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------- federation fixtures


@dataclass
class Keys:
    root: Path
    secret: Any
    public: Any
    public_path: Path
    site_keys_dir: Path
    signing: dict[str, Any] = field(default_factory=dict)

    def site(self, name: str) -> Any:
        from shared.signing import generate_site_key, load_private_key, private_key_path

        if name not in self.signing:
            generate_site_key(self.site_keys_dir, name)
            self.signing[name] = load_private_key(private_key_path(self.site_keys_dir, name))
        return self.signing[name]


def make_keys(root: Path, preset: str | None = None) -> Keys:
    from shared.ckks import init_keys, load_context

    files = init_keys(root / "keys", preset) if preset else init_keys(root / "keys")
    secret = load_context(files.secret_context, require_secret=True)
    public = load_context(files.public_context, require_secret=False)
    (root / "site-keys").mkdir(parents=True, exist_ok=True)
    from shared.signing import generate_aggregator_key

    generate_aggregator_key(root / "keys")
    return Keys(root, secret, public, files.public_context, root / "site-keys")


LAYOUT_FP = "bench-layout-000000000001"


def build(keys: Keys, site: str, seq: int, delta: np.ndarray, *, mode: str = "dense", fraction: float = 1.0,
          shard_count: int = 1, base: int = 0):
    """Encoded, signed chunks of one update (and the BuiltUpdate)."""
    from shared.codec import encode_update_chunk
    from site_agent.update_builder import UpdateIdentity, build_update

    built = build_update(
        delta, None, UpdateIdentity(site, seq, base, 1.0), keys.secret, LAYOUT_FP, keys.site(site),
        mode=mode, fraction=fraction, max_message_bytes=MAX_MESSAGE_BYTES, shard_count=shard_count,
    )
    return [encode_update_chunk(c) for c in built.chunks], built


def agg_settings(keys: Keys, state_dir: Path, **kw: Any):
    from aggregator.settings import AggregatorSettings

    base: dict[str, Any] = dict(
        public_context=keys.public_path, site_keys_dir=keys.site_keys_dir, state_dir=state_dir,
        signing_key=keys.root / "keys" / "aggregator.hybrid", check_user_id=False, log_json=False, snapshot_every=0, housekeeping_s=0.5, max_staleness=1000,
        max_message_bytes=MAX_MESSAGE_BYTES,
    )
    base.update(kw)
    return AggregatorSettings(**base)


@contextlib.contextmanager
def private_broker() -> Iterator[Any]:
    """A private RabbitMQ node (own name, ports, data dir), stopped afterwards."""
    from broker.local_node import LocalRabbitNode

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


def _connect(url: str):  # type: ignore[no-untyped-def]
    """A confirm-mode link through the transport seam (pika stays in broker/)."""
    from broker.connection import connect
    from broker.transport import AmqpLink

    return AmqpLink(connect(url, attempts=10))


def declare_all(url: str, shards: int = 1) -> None:
    from broker.topology import EXCHANGES, aggregator_queue_specs

    link = _connect(url)
    try:
        link.declare(EXCHANGES, aggregator_queue_specs(shards))
    finally:
        link.close()


def publish(url: str, bodies: list[bytes], shard_of: Callable[[bytes], int] | None = None) -> float:
    """Publish with confirms; returns the seconds it took."""
    from broker.topology import UPDATES_EXCHANGE, shard_key
    from broker.transport import Message

    link = _connect(url)
    try:
        t = time.perf_counter()
        for body in bodies:
            key = shard_key(shard_of(body) if shard_of else 0)
            link.publish(Message(UPDATES_EXCHANGE, key, body, mandatory=True))
        return time.perf_counter() - t
    finally:
        link.close()


class _AggThread:
    def __init__(self, settings: Any) -> None:
        from aggregator.consumer import AggregatorService

        self.service = AggregatorService(settings)
        self.thread = threading.Thread(target=self.service.run, daemon=True)

    def __enter__(self) -> "_AggThread":
        self.thread.start()
        if not self.service.ready.wait(60):
            raise RuntimeError("aggregator did not connect within 60s")
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(60)


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


# ----------------------------------------------------------------------------- 1. fold end to end + floor


def fold_end_to_end(sz: Sizes, urls: Callable[[], str], tmp: Path) -> dict[str, Any]:
    """Updates published to the broker first; then the aggregator consumer is started and timed from
    consuming (ready) to the last version committed and published."""
    from aggregator import fold as foldmod
    from shared.ckks import load_ciphertext
    from shared.codec import decode_update_chunk

    keys = make_keys(tmp / "fold")
    rng = np.random.default_rng(0)
    n_up, P, K = sz.fold_updates, sz.fold_params, sz.fold_buffer
    updates = [build(keys, f"site-{i % 8}", i // 8 + 1, rng.uniform(-0.5, 0.5, P))[0] for i in range(n_up)]
    values = n_up * (-(-P // SLOTS)) * SLOTS  # encrypted values (full blocks) folded
    e2e, pub = [], []
    for r in range(sz.repeats):
        url = urls()
        declare_all(url)
        pub.append(publish(url, [b for u in updates for b in u]))
        settings = agg_settings(keys, tmp / f"fold-state-{r}", amqp_url=url, buffer_size=K)
        with _AggThread(settings) as agg:
            t0 = time.perf_counter()
            _wait(lambda: agg.service.engine.updates_folded_total >= n_up and agg.service.engine.version >= n_up // K,
                  600, "fold end to end")
            e2e.append(time.perf_counter() - t0)
            units = agg.service.engine.sites and max(
                int(i.last_weight_units or 1) for i in agg.service.engine.sites.values())
    # floor: deserialize + homomorphic add of the same ciphertexts, alone (m = 1) and with the
    # weight units the aggregator used (double-and-add)
    cts = [[b.ciphertext for c in (decode_update_chunk(x, max_bytes=MAX_MESSAGE_BYTES) for x in u) for b in c.blocks]
           for u in updates]
    idx = [[b.index for c in (decode_update_chunk(x, max_bytes=MAX_MESSAGE_BYTES) for x in u) for b in c.blocks]
           for u in updates]

    def floor_once(m: int) -> float:
        buf: dict = {}
        t = time.perf_counter()
        for u, ix in zip(cts, idx):
            foldmod.fold_into(buf, [(i, load_ciphertext(keys.public, ct)) for i, ct in zip(ix, u)], m)
        return time.perf_counter() - t

    floor1 = [floor_once(1) for _ in range(sz.repeats)]
    floor_m = [floor_once(int(units or 1)) for _ in range(sz.repeats)]
    # plaintext float32 summation of the same number of values
    plain = [rng.uniform(-0.5, 0.5, values // n_up).astype(np.float32) for _ in range(n_up)]

    def plain_once() -> float:
        acc = np.zeros_like(plain[0])
        t = time.perf_counter()
        for _ in range(20):
            acc[:] = 0
            for p in plain:
                acc += p
        return (time.perf_counter() - t) / 20

    fp32 = [plain_once() for _ in range(max(3, sz.repeats))]
    e2e_rate = values / median(e2e)
    floor_rate = values / median(floor1)
    return {
        "aggregator_fold_values_per_s": e2e_rate,
        "aggregator_floor_values_per_s": floor_rate,
        "aggregator_floor_same_units_values_per_s": values / median(floor_m),
        "plaintext_fp32_sum_values_per_s": values / median(fp32),
        "aggregator_vs_floor": e2e_rate / floor_rate,
        "aggregator_vs_floor_same_units": e2e_rate / (values / median(floor_m)),
        "fp32_sum_vs_aggregator": (values / median(fp32)) / e2e_rate,
        "fold_workload": {"updates": n_up, "params_per_update": P, "encrypted_values": values, "buffer_size": K,
                          "weight_units": int(units or 1), "bytes_published": sum(len(b) for u in updates for b in u),
                          "end_to_end_seconds": e2e, "publish_seconds": pub, "floor_seconds": floor1,
                          "floor_same_units_seconds": floor_m},
    }


# ----------------------------------------------------------------------------- 2. wire bytes + AUC table


def small_cnn_params() -> int:
    from site_agent.model_state import FederatedModel

    return int(FederatedModel.create("small_cnn", 0).layout.size)


def wire_bytes(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """Bytes on the wire per update / dense float32 bytes, for the small_cnn size, default site settings
    (top-k 0.5, the default CKKS preset) and over top-k levels x presets."""
    from site_agent.settings import SiteSettings

    defaults = SiteSettings.model_fields
    mode, frac = defaults["sparsity_mode"].default, defaults["topk_fraction"].default
    P = small_cnn_params()
    rng = np.random.default_rng(1)
    delta = rng.normal(0, 0.01, P)
    table = []
    default_ratio = None
    for preset in sz.auc_presets:
        keys = make_keys(tmp / f"wire-{preset}", preset)
        for level in sz.auc_levels:
            m = "dense" if level >= 1.0 else "topk"
            bodies, built = build(keys, "site-a", 1, delta, mode=m, fraction=level)
            ratio = sum(map(len, bodies)) / (4 * P)
            table.append({"preset": preset, "topk_fraction": level, "blocks_sent": len(built.sent_indices),
                          "bytes": sum(map(len, bodies)), "ratio_vs_dense_fp32": ratio})
            if preset == DEFAULT_PRESET and m == mode and (m == "dense" or abs(level - frac) < 1e-9):
                default_ratio = ratio
    if default_ratio is None:  # the default level was not in the table: measure it
        keys = make_keys(tmp / "wire-default")
        bodies, _ = build(keys, "site-a", 1, delta, mode=mode, fraction=frac)
        default_ratio = sum(map(len, bodies)) / (4 * P)
    return {"wire_bytes_ratio_vs_dense_fp32": default_ratio, "wire_default": {"sparsity_mode": mode,
            "topk_fraction": frac, "ckks_preset": DEFAULT_PRESET, "params": P}, "wire_table": table}


def data_npz() -> Path | None:
    root = os.environ.get("FEDMQ_DATA_ROOT")
    cands = [Path(root) / "pneumoniamnist.npz"] if root else []
    cands.append(ROOT.parent / "shared" / "data" / "pneumoniamnist.npz")
    return next((p for p in cands if p.is_file()), None)


def auc_table(sz: Sizes, tmp: Path, wire: dict[str, Any]) -> dict[str, Any]:
    """AUC cost of each top-k level (default CKKS preset) and each CKKS preset (at the default
    top-k), vs dense FedAvg: short in-process simulations of the shipped engine (always encrypted)."""
    from experiments.simulation import FederationSettings, LocalSettings, load_federation_data, run_federation_sim

    npz = data_npz()
    if npz is None:
        return {"auc_table": None, "auc_note": "pneumoniamnist.npz not found (set FEDMQ_DATA_ROOT)"}
    data = load_federation_data(npz, n_sites=3, alpha=0.5, val_fraction=0.15, seed=0)
    if sz.auc_train_per_site:
        for s in data.sites:
            s.X_train, s.y_train = s.X_train[: sz.auc_train_per_site], s.y_train[: sz.auc_train_per_site]
    local = LocalSettings(lr=2e-3, optimizer="adam", batch_size=64, local_epochs=1)

    def run(**kw: Any) -> float:
        aucs = []
        for seed in sz.auc_seeds:
            fed = FederationSettings(n_sites=3, mode="sync", rounds=sz.auc_rounds, **kw)
            aucs.append(run_federation_sim(data, local, fed, seed=seed).test_auc)
        return median(aucs)

    t = time.perf_counter()
    base = run(sparsity_mode="dense", topk_fraction=1.0)
    by_level = {}
    for level in sz.auc_levels:
        by_level[level] = base if level >= 1.0 else run(sparsity_mode="topk", topk_fraction=level)
    default_frac = wire["wire_default"]["topk_fraction"]
    by_preset = {}
    for preset in sz.auc_presets:
        by_preset[preset] = run(sparsity_mode="topk", topk_fraction=default_frac, ckks_preset=preset)
    rows = []
    for r in wire["wire_table"]:
        level = r["topk_fraction"]
        sparse_cost = base - by_level[level]
        ckks_cost = by_preset[r["preset"]] - by_level.get(default_frac, by_preset[r["preset"]])
        rows.append({**r, "auc": by_level[level], "auc_cost_points": 100 * (sparse_cost - ckks_cost)})
    return {
        "auc_table": rows,
        "auc_dense": base,
        "auc_by_topk": {str(k): v for k, v in by_level.items()},
        "auc_by_preset_encrypted_at_default_topk": by_preset,
        "auc_method": (f"experiments.simulation.run_federation_sim: 3 sites (Dirichlet 0.5), sync FedAvg, "
                       f"{sz.auc_rounds} rounds, non-DP Adam, <= {sz.auc_train_per_site} training images per site, "
                       f"seeds {list(sz.auc_seeds)}; the shipped AggregatorEngine in-process, every update "
                       f"CKKS-encrypted; test AUC on the official test split; top-k levels under the default "
                       f"preset, presets at top-k {default_frac}; cost = dense AUC - AUC (top-k) + (default-preset "
                       f"AUC - preset AUC, at the default top-k)"),
        "auc_seconds": time.perf_counter() - t,
    }


# ----------------------------------------------------------------------------- 3. site overhead


def site_overhead(sz: Sizes, urls: Callable[[], str], tmp: Path) -> dict[str, Any]:
    """Per round, small_cnn, the site agent's defaults (DP-SGD on, top-k 0.5, the default CKKS preset): local
    training vs sparsify + encrypt + sign + publish with confirms to the private broker."""
    from experiments.simulation import load_federation_data
    from shared.codec import encode_update_chunk
    from site_agent.model_state import FederatedModel
    from site_agent.runtime import training_config
    from site_agent.settings import SiteSettings
    from site_agent.training import LocalTrainer
    from site_agent.update_builder import UpdateIdentity, build_update

    npz = data_npz()
    if npz is None:
        return {"site_overhead_fraction": None, "site_overhead_note": "no data"}
    data = load_federation_data(npz, n_sites=3, alpha=0.5, val_fraction=0.15, seed=0)
    X = np.concatenate([s.X_train.numpy() for s in data.sites])
    y = np.concatenate([s.y_train.numpy() for s in data.sites])
    n = sz.overhead_train_samples or len(X) // 3
    import torch

    X, y = torch.from_numpy(X[:n]), torch.from_numpy(y[:n])
    settings = SiteSettings(site_id="hospital-1", secret_context=tmp / "x", signing_key=tmp / "x", aggregator_public_key=tmp / "x", manifest=tmp / "x",
                            state_dir=tmp / "x", progress_bars=False)
    cfg = training_config(settings)
    keys = make_keys(tmp / "overhead")
    fm = FederatedModel.create("small_cnn", 0)
    trainer = LocalTrainer(cfg, tmp / "overhead-ledger.json", progress=False)
    url = urls()
    declare_all(url)
    residual = None
    base = fm.x0.copy()
    rows = []
    for r in range(sz.overhead_rounds):
        t = time.perf_counter()
        res = trainer.train_round(fm.layout.unflatten(base), X, y, round_index=r + 1)
        train_s = time.perf_counter() - t
        delta = fm.layout.flatten(res.state_dict) - base
        t = time.perf_counter()
        built = build_update(delta, residual, UpdateIdentity("hospital-1", r + 1, 0, float(n)), keys.secret,
                             fm.layout.fingerprint, keys.site("hospital-1"), mode=settings.sparsity_mode,
                             fraction=settings.topk_fraction, max_message_bytes=settings.max_message_bytes)
        bodies = [encode_update_chunk(c) for c in built.chunks]
        build_s = time.perf_counter() - t
        residual = built.residual
        publish_s = publish(url, bodies)
        rows.append({"train_s": train_s, "sparsify_encrypt_sign_s": build_s, "encrypt_s": built.encrypt_seconds,
                     "publish_s": publish_s, "bytes": sum(map(len, bodies)),
                     "fraction": (build_s + publish_s) / train_s})
    return {
        "site_overhead_fraction": median([r["fraction"] for r in rows]),
        "site_overhead": {"train_samples": n, "dp_enabled": settings.dp_enabled, "model": "small_cnn",
                          "sparsity": f"{settings.sparsity_mode} {settings.topk_fraction}",
                          "train_s": median([r["train_s"] for r in rows]),
                          "sparsify_encrypt_sign_s": median([r["sparsify_encrypt_sign_s"] for r in rows]),
                          "publish_s": median([r["publish_s"] for r in rows]), "rounds": rows},
    }


# ----------------------------------------------------------------------------- 4. scaling


def _engine_version_seconds(keys: Keys, state_dir: Path, bodies: list[bytes], K: int) -> float:
    """The aggregator engine's own work for one version (decode, verify, WAL fsync, fold, commit +
    checkpoint, version messages), fed in-process: no broker."""
    from aggregator.engine import AggregatorEngine

    engine = AggregatorEngine(agg_settings(keys, state_dir, buffer_size=K))
    try:
        t = time.perf_counter()
        for b in bodies:
            d, _ = engine.handle_chunk(b)
            if d.action != "accept":
                raise RuntimeError(f"bench update refused: {d.reason} {d.detail}")
        elapsed = time.perf_counter() - t
        assert engine.version == 1, engine.version
        return elapsed
    finally:
        engine.close()


def scaling_sites(sz: Sizes, tmp: Path) -> dict[str, Any]:
    keys = make_keys(tmp / "scale-sites")
    rng = np.random.default_rng(2)
    P = sz.site_params
    nmax = max(sz.site_counts)
    ups = [build(keys, f"site-{i}", 1, rng.uniform(-0.5, 0.5, P))[0] for i in range(nmax)]
    rows = []
    for n in sz.site_counts:
        bodies = [b for u in ups[:n] for b in u]
        secs = [_engine_version_seconds(keys, tmp / f"scale-sites-{n}-{r}", bodies, n) for r in range(sz.repeats)]
        s = median(secs)
        rows.append({"sites": n, "seconds_per_version": s, "values_per_s": n * P / s,
                     "seconds_per_update": s / n})
    return {"scaling_sites": {"params_per_update": P, "mode": "dense", "K": "= number of sites (one version)",
                              "rows": rows}}


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def scaling_model(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """One update per preset size, random delta; dense where ~5 copies of the ciphertexts (update
    chunks, WAL, deserialized buffer, D, D's serialized cache) fit half the available memory."""
    import gc

    keys = make_keys(tmp / "scale-model")
    budget = sz.memory_budget_bytes or _mem_available() // 2
    rows = []
    for preset in sz.model_presets:
        P = small_cnn_params() if preset == "small_cnn" else MODEL_PARAMS[preset]
        blocks = -(-P // SLOTS)
        dense_bytes = blocks * (keys.public.preset.seeded_bytes + 48)
        dense = 5 * dense_bytes <= budget
        frac = 1.0 if dense else sz.model_topk
        rng = np.random.default_rng(3)
        delta = rng.uniform(-0.5, 0.5, P)
        t = time.perf_counter()
        bodies, built = build(keys, "site-a", 1, delta, mode="dense" if dense else "topk", fraction=frac)
        build_s = time.perf_counter() - t
        del delta
        nbytes = sum(map(len, bodies))
        reps = sz.repeats if blocks * frac < 2000 else 1
        secs = [_engine_version_seconds(keys, tmp / f"scale-model-{preset}-{r}", bodies, 1) for r in range(reps)]
        rows.append({"model": preset, "params": P, "blocks": blocks, "mode": "dense" if dense else f"topk {frac}",
                     "blocks_sent": len(built.sent_indices), "update_bytes": nbytes,
                     "dense_update_bytes_estimate": dense_bytes, "site_build_seconds": build_s,
                     "aggregator_seconds_per_version": median(secs), "repeats": reps,
                     "values_per_s": len(built.sent_indices) * SLOTS / median(secs)})
        del bodies, built
        gc.collect()
    return {"scaling_model": {"memory_budget_bytes": budget, "K": 1, "rows": rows}}


# ----------------------------------------------------------------------------- 5. shard speedup


def _spawn_shard(keys: Keys, url: str, state: Path, index: int, count: int, K: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_CHECK_USER_ID="false", FEDMQ_LOG_JSON="false",
               FEDMQ_MAX_STALENESS="1000", FEDMQ_SNAPSHOT_EVERY="0", FEDMQ_HOUSEKEEPING_S="0.5",
               FEDMQ_LOG_LEVEL="WARNING")
    state.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "aggregator", "--state-dir", str(state), "--amqp-url", url,
           "--public-context", str(keys.public_path), "--site-keys", str(keys.site_keys_dir),
           "--signing-key", str(keys.root / "keys" / "aggregator.hybrid"),
           "--buffer-size", str(K), "--shard-index", str(index), "--shard-count", str(count)]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(state / "aggregator.log", "ab"), start_new_session=True)


def _consumers(url: str, queue: str) -> int:
    link = _connect(url)
    try:
        return link.consumer_count(queue)
    finally:
        link.close()


def _status_version(state: Path) -> int:
    try:
        return int(json.loads((state / "status.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return -1


def _shard_run(keys: Keys, urls: Callable[[], str], tmp: Path, bodies: list[bytes], count: int, K: int, versions: int,
               tag: str) -> float:
    """Aggregator processes started and consuming, then SIGSTOPped; the workload is published; the
    clock runs from SIGCONT to every shard's status.json reaching ``versions``."""
    from broker.topology import updates_queue
    from site_agent.update_builder import shard_of_encoded

    url = urls()
    declare_all(url, count)
    states = [tmp / f"shard-{tag}-{count}-{i}" for i in range(count)]
    procs = [_spawn_shard(keys, url, states[i], i, count, K) for i in range(count)]
    try:
        _wait(lambda: all(_consumers(url, updates_queue(i)) >= 1 for i in range(count)), 120, "shards consuming")
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        publish(url, bodies, shard_of_encoded)
        t0 = time.perf_counter()
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
        _wait(lambda: all(_status_version(s) >= versions for s in states), 600, "shards folding")
        return time.perf_counter() - t0
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def shard_speedup(sz: Sizes, urls: Callable[[], str], tmp: Path) -> dict[str, Any]:
    keys = make_keys(tmp / "shards")
    rng = np.random.default_rng(4)
    K = 3
    n_up = max(K, sz.shard_updates - sz.shard_updates % K)
    deltas = [rng.uniform(-0.5, 0.5, sz.shard_params) for _ in range(n_up)]
    one = [b for i, d in enumerate(deltas) for b in build(keys, f"site-{i % 3}", i // 3 + 1, d)[0]]
    two = [b for i, d in enumerate(deltas) for b in build(keys, f"site-{i % 3}", i // 3 + 1, d, shard_count=2)[0]]
    t1, t2 = [], []
    for r in range(sz.repeats):  # interleaved, so drift on a shared machine hits both alike
        t1.append(_shard_run(keys, urls, tmp, one, 1, K, n_up // K, f"r{r}"))
        t2.append(_shard_run(keys, urls, tmp, two, 2, K, n_up // K, f"r{r}"))
    return {"shard_speedup_2": median(t1) / median(t2),
            "shard_workload": {"updates": n_up, "params_per_update": sz.shard_params, "K": K,
                               "one_shard_seconds": t1, "two_shards_seconds": t2, "cpus": os.cpu_count()}}


# ----------------------------------------------------------------------------- 6. async vs sync


def resnet50_scale(urls: Callable[[], str], tmp: Path, *, params: int) -> dict[str, Any]:
    """Issue 13's figures: CKKS bytes/value, a dense ResNet-50-size update built and folded (benchmarks.resnet50)."""
    from benchmarks.resnet50 import resnet50_scale as run_resnet50

    return run_resnet50(urls, tmp, params=params)


# ----------------------------------------------------------------------------- 7. async vs sync


def async_vs_sync(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """A one-seed, small-slice run of ``fedmq experiment async-vs-sync`` (experiments.async_vs_sync):
    the same code as the full comparison, no input but the dataset (the full run's figures live in
    reports/reproduce/results.json and docs/results.md, not here)."""
    from experiments.async_vs_sync import AsyncVsSyncConfig, run
    from experiments.federation import SiteTraining

    npz = data_npz()
    if npz is None:
        return {"async_vs_sync_speedup": None, "async_vs_sync": {"note": "no data"}}
    # a small, seeded slice of the real data (kept in the temp dir, never in the repository)
    rng = np.random.default_rng(0)
    data = np.load(npz)
    out = {}
    for split, n in (("train", sz.avs_train), ("val", max(60, sz.avs_train // 5)), ("test", max(80, sz.avs_train // 4))):
        idx = np.sort(rng.choice(len(data[f"{split}_labels"]), size=min(n, len(data[f"{split}_labels"])), replace=False))
        out[f"{split}_images"], out[f"{split}_labels"] = data[f"{split}_images"][idx], data[f"{split}_labels"][idx]
    small = tmp / "avs-data" / "pneumoniamnist.npz"
    small.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(small, **out)
    cfg = AsyncVsSyncConfig(
        data_npz=small, out=tmp / "avs-out", reproduce_results=None, workdir=tmp / "avs", seeds=1, buffer_size=2,
        dp_enabled=False, planned_rounds=30, training=SiteTraining(), target_auc=sz.avs_target_auc,
        time_limit_s=sz.avs_time_limit_s, retrain_after_s=20.0,
    )
    entry = run(cfg, progress=lambda m: log.info("avs: %s", m))
    res = {k: v for k, v in entry.items() if k != "runs"}
    res.update(train_images=sz.avs_train, time_limit_s=sz.avs_time_limit_s)
    a, s = res["async_seconds_to_target"], res["sync_seconds_to_target"]
    if a and not s:
        res["note"] = f"sync did not reach the target within {sz.avs_time_limit_s}s: the ratio is a lower bound"
        s = sz.avs_time_limit_s
    return {"async_vs_sync_speedup": (s / a) if a and s else None, "async_vs_sync": res}


# ----------------------------------------------------------------------------- run + report


def machine() -> dict[str, Any]:
    from importlib import metadata

    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "tenseal": metadata.version("tenseal"), "load_average": os.getloadavg(),
            "memory_available_bytes": _mem_available()}


SECTIONS = ("fold", "wire", "auc", "overhead", "signatures", "scaling_sites", "scaling_model", "resnet50", "shards",
            "async_vs_sync")


from benchmarks.signatures import signature_costs  # noqa: E402  (needs the helpers above)


def run(sz: Sizes, *, tmp: Path | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "sizes": asdict(sz), "goals": GOALS, "sections_seconds": {}}
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmpdir = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-bench-")))
        # the private RabbitMQ node runs as the rabbitmq user when we are root: it must reach the
        # definitions file run_federation writes under this directory
        os.chmod(tmpdir, 0o755)
        needs_broker = {"fold", "overhead", "shards", "resnet50"} - set(sz.skip)
        node = stack.enter_context(private_broker()) if needs_broker else None

        def urls() -> str:
            return fresh_url(node)
        wire: dict[str, Any] = {}
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("fold", lambda: fold_end_to_end(sz, urls, tmpdir)),
            ("wire", lambda: wire_bytes(sz, tmpdir)),
            ("auc", lambda: auc_table(sz, tmpdir, wire)),
            ("overhead", lambda: site_overhead(sz, urls, tmpdir)),
            ("signatures", lambda: signature_costs(sz, tmpdir, result.get("site_overhead"))),
            ("scaling_sites", lambda: scaling_sites(sz, tmpdir)),
            ("scaling_model", lambda: scaling_model(sz, tmpdir)),
            ("resnet50", lambda: resnet50_scale(urls, tmpdir, params=sz.resnet50_params)),
            ("shards", lambda: shard_speedup(sz, urls, tmpdir)),
            ("async_vs_sync", lambda: async_vs_sync(sz, tmpdir)),
        ]
        for name, fn in steps:
            if name in sz.skip:
                continue
            progress(f"[bench] {name} ...")
            t = time.perf_counter()
            try:
                out = fn()
            except Exception as exc:  # one failed section must not lose the others
                log.exception("benchmark section %s failed", name)
                out = {f"{name}_error": f"{type(exc).__name__}: {exc}"}
            result["sections_seconds"][name] = time.perf_counter() - t
            if name == "wire":
                wire = out
            result.update(out)
            progress(f"[bench] {name} done in {result['sections_seconds'][name]:.0f}s")
    result["gpu_resnet50_training"] = {"measured": False, "reason": "not measured: no GPU machine was lent"}
    result["total_seconds"] = time.perf_counter() - started
    result["verdicts"] = verdicts(result)
    return result


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    def v(x: Any, ok: Callable[[float], bool]) -> dict[str, Any]:
        return {"value": x, "met": (bool(ok(x)) if isinstance(x, (int, float)) else None)}

    wire_ok = None
    rows = r.get("auc_table") or []
    default = r.get("wire_default", {})
    for row in rows:
        if row["preset"] == default.get("ckks_preset") and abs(row["topk_fraction"] - default.get("topk_fraction", -1)) < 1e-9:
            wire_ok = row["ratio_vs_dense_fp32"] <= 1.0 and row["auc_cost_points"] <= 1.0
    meeting = [row for row in rows if row["ratio_vs_dense_fp32"] <= 1.0 and row["auc_cost_points"] <= 1.0]
    return {
        "aggregator_vs_floor": v(r.get("aggregator_vs_floor"), lambda x: x >= 0.5),
        "wire_bytes_ratio_vs_dense_fp32": {"value": r.get("wire_bytes_ratio_vs_dense_fp32"), "met": wire_ok,
                                           "settings_meeting_goal": [(m["preset"], m["topk_fraction"]) for m in meeting]},
        "site_overhead_fraction": v(r.get("site_overhead_fraction"), lambda x: x <= 0.10),
        "shard_speedup_2": v(r.get("shard_speedup_2"), lambda x: x >= 1.7),
        "audit_verify_100x3_s": v(r.get("audit_verify_100x3_s"), lambda x: x <= 1.0),
        "hybrid_sign_verify_share_of_site_round": v(
            (r.get("signatures") or {}).get("site_sign_plus_verify_share_of_training"), lambda x: x <= 0.05),
        "ckks_bytes_per_value": v(r.get("ckks_bytes_per_value"), lambda x: x <= 7.1),
        "resnet50_site_build_seconds": v(r.get("resnet50_site_build_seconds"), lambda x: x <= 5.0),
        "resnet50_fold_seconds": v(r.get("resnet50_fold_seconds"), lambda x: x <= 5.0),
        "aggregator_peak_rss_vs_encrypted_model": v(r.get("aggregator_peak_rss_vs_encrypted_model"), lambda x: x <= 3.0),
    }


def _f(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if abs(x) >= 1e4:
            return f"{x:,.0f}"
        return format(x, spec)
    return str(x)


def markdown(r: dict[str, Any]) -> str:
    vd = r.get("verdicts", {})

    def met(k: str) -> str:
        m = vd.get(k, {}).get("met")
        return "met" if m else ("missed" if m is False else "n/a")

    lines = [
        "# fedmq benchmarks (latest run)",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}, torch {r['machine']['torch']}, "
        f"{r['machine']['platform']}. Every figure is a median of repeats of this run; ratios compare figures of this "
        f"run. Total {r.get('total_seconds', 0):.0f} s. Produced by `make bench` (`python -m benchmarks`).",
        "",
        "## Goals",
        "",
        "| figure | this run | goal | verdict |",
        "|---|---|---|---|",
        f"| aggregator end to end / floor | {_f(r.get('aggregator_vs_floor'))} | >= 0.5 | {met('aggregator_vs_floor')} |",
        f"| wire bytes per update / dense float32 (defaults: top-k 0.5, {DEFAULT_PRESET}) | "
        f"{_f(r.get('wire_bytes_ratio_vs_dense_fp32'))} | <= 1.0 at <= 1 AUC point | {met('wire_bytes_ratio_vs_dense_fp32')} |",
        f"| site overhead (sparsify+encrypt+sign+publish) / local training | {_f(r.get('site_overhead_fraction'))} | "
        f"<= 0.10 | {met('site_overhead_fraction')} |",
        f"| two aggregator shards / one shard (processes, {r['machine']['cpus']} cores) | {_f(r.get('shard_speedup_2'))} "
        f"| >= 1.7 | {met('shard_speedup_2')} |",
        f"| time to target AUC, sync / async (one 4x straggler) | {_f(r.get('async_vs_sync_speedup'))} | (reported) | |",
        f"| audit verify, 100 versions x 3 sites | {_f(r.get('audit_verify_100x3_s'))} s | <= 1 s | "
        f"{met('audit_verify_100x3_s')} |",
        f"| hybrid sign (update) + verify (version) / site training round | "
        f"{_f((r.get('signatures') or {}).get('site_sign_plus_verify_share_of_training'))} | <= 0.05 | "
        f"{met('hybrid_sign_verify_share_of_site_round')} |",
        f"| CKKS bytes per value ({DEFAULT_PRESET}) | {_f(r.get('ckks_bytes_per_value'))} | <= 7.1 (goal 6.2) | "
        f"{met('ckks_bytes_per_value')} |",
        f"| dense ResNet-50-size update built at the site (sparsify + encrypt + sign), s | "
        f"{_f(r.get('resnet50_site_build_seconds'))} | <= 5 | {met('resnet50_site_build_seconds')} |",
        f"| the same update folded by the aggregator from the broker, s | {_f(r.get('resnet50_fold_seconds'))} | <= 5 | "
        f"{met('resnet50_fold_seconds')} |",
        f"| aggregator peak RSS / encrypted model size | {_f(r.get('aggregator_peak_rss_vs_encrypted_model'))} "
        f"({_f(r.get('aggregator_peak_rss_bytes'))} B) | <= 3 | {met('aggregator_peak_rss_vs_encrypted_model')} |",
        "| ResNet-50 GPU training throughput | not measured: no GPU machine was lent | | |",
        "",
        "## Aggregator throughput (encrypted values per second)",
        "",
        "| path | values/s |",
        "|---|---|",
        f"| end to end: broker -> consumer -> folded, committed, published | {_f(r.get('aggregator_fold_values_per_s'))} |",
        f"| floor: deserialize + add (m = 1), alone | {_f(r.get('aggregator_floor_values_per_s'))} |",
        f"| floor with the run's weight units (double-and-add) | {_f(r.get('aggregator_floor_same_units_values_per_s'))} |",
        f"| plaintext float32 summation, same values | {_f(r.get('plaintext_fp32_sum_values_per_s'))} |",
        "",
    ]
    if r.get("wire_table"):
        lines += ["## Wire bytes and AUC cost (small_cnn)", "",
                  "| CKKS preset | top-k fraction | blocks sent | bytes / update | vs dense float32 | AUC cost (points) |",
                  "|---|---|---|---|---|---|"]
        rows = r.get("auc_table") or r["wire_table"]
        for row in rows:
            lines.append(f"| {row['preset']} | {row['topk_fraction']} | {row['blocks_sent']} | {row['bytes']:,} | "
                         f"{row['ratio_vs_dense_fp32']:.2f}x | {_f(row.get('auc_cost_points'), '.2f')} |")
        if r.get("auc_method"):
            lines += ["", f"AUC: {r['auc_method']}. Dense AUC {_f(r.get('auc_dense'), '.4f')}."]
        lines.append("")
    so = r.get("site_overhead")
    if so:
        lines += ["## Site overhead per round", "",
                  f"small_cnn, {so['train_samples']} images, DP-SGD {'on' if so['dp_enabled'] else 'off'}, {so['sparsity']}: "
                  f"training {so['train_s']:.2f} s, sparsify+encrypt+sign {so['sparsify_encrypt_sign_s']:.3f} s, "
                  f"publish {so['publish_s']:.3f} s.", ""]
    sg = r.get("signatures")
    if sg:
        lines += ["## Signatures (hybrid Ed25519 + ML-DSA-65) and the audit chain", "",
                  f"Sizes: Ed25519 {sg['ed25519_signature_bytes']} B, ML-DSA-65 {sg['mldsa65_signature_bytes']} B, "
                  f"hybrid (both, msgpack) {sg['hybrid_signature_bytes']} B per signed message; public keys "
                  f"{sg['ed25519_public_key_bytes']} + {sg['mldsa65_public_key_bytes']} B.", "",
                  "| operation | Ed25519 | ML-DSA-65 | hybrid |", "|---|---|---|---|",
                  f"| sign / s | {_f(sg['ed25519_sign_per_s'])} | {_f(sg['mldsa65_sign_per_s'])} | {_f(sg['hybrid_sign_per_s'])} |",
                  f"| verify / s | {_f(sg['ed25519_verify_per_s'])} | {_f(sg['mldsa65_verify_per_s'])} | "
                  f"{_f(sg['hybrid_verify_per_s'])} |", "",
                  f"Aggregator, one dense update of {sg['update_values']:,} values ({sg['update_bytes']:,} B, "
                  f"{sg['update_chunks']} chunk(s)): hybrid verification {sg['aggregator_verify_update_s'] * 1e3:.1f} ms "
                  f"(of which SHA-512 of the payload {sg['aggregator_hash_update_s'] * 1e3:.1f} ms; Ed25519 alone would be "
                  f"{sg['aggregator_ed25519_only_verify_update_s'] * 1e3:.1f} ms) = "
                  f"{_f(sg['hybrid_verify_share_of_engine'])} of the engine's {sg['aggregator_engine_update_s']:.3f} s "
                  f"for that update; the ML-DSA half adds {_f(sg['hybrid_extra_vs_ed25519_share_of_engine'])}. "
                  f"Site: signing the update {sg['site_sign_update_s'] * 1e3:.1f} ms. "
                  f"Audit chain of 100 versions x 3 sites ({sg['audit_chain_bytes']:,} B) verified in "
                  f"{sg['audit_verify_100x3_s']:.3f} s. {sg['note']}.", ""]
    ss = r.get("scaling_sites")
    if ss:
        lines += ["## Aggregator time per version vs number of sites", "",
                  f"Engine in-process (decode, verify, WAL fsync, fold, commit + checkpoint), dense updates of "
                  f"{ss['params_per_update']:,} values, K = number of sites.", "",
                  "| sites | s / version | s / update | values/s |", "|---|---|---|---|"]
        lines += [f"| {x['sites']} | {x['seconds_per_version']:.3f} | {x['seconds_per_update']:.4f} | {_f(x['values_per_s'])} |"
                  for x in ss["rows"]]
        lines.append("")
    sm = r.get("scaling_model")
    if sm:
        lines += ["## Aggregator time per version vs model size", "",
                  "One update, K = 1, random delta of the model's size. Dense where ~5 copies of its ciphertexts fit "
                  f"half the available memory ({sm['memory_budget_bytes'] / 2**30:.1f} GiB), else top-k.", "",
                  "| model | parameters | sent | update bytes | dense would be | site build s | aggregator s / version | values/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {x['model']} | {x['params']:,} | {x['mode']} ({x['blocks_sent']} blocks) | {x['update_bytes']:,} | "
                  f"{x['dense_update_bytes_estimate']:,} | {x['site_build_seconds']:.1f} | "
                  f"{x['aggregator_seconds_per_version']:.2f} | {_f(x['values_per_s'])} |" for x in sm["rows"]]
        lines.append("")
    r50 = r.get("resnet50")
    if r50:
        lines += ["## Privacy at ResNet-50 scale", "",
                  f"One dense update of {r50['params']:,} values ({r50['blocks']} blocks): "
                  f"{_f(r.get('resnet50_update_bytes'))} bytes = {r50['update_vs_dense_fp32']:.2f}x its float32 form; "
                  f"built in {_f(r.get('resnet50_site_build_seconds'))} s on {r50['encrypt_workers']} encryption workers "
                  f"(load average {r50['load_average_at_build']:.1f} when it started); folded end to end in "
                  f"{_f(r.get('resnet50_fold_seconds'))} s (floor: deserialize + fold alone "
                  f"{_f(r.get('resnet50_floor_seconds'))} s, ratio {_f(r.get('resnet50_fold_vs_floor'))}); version 1 "
                  f"committed and published in {_f(r.get('resnet50_version_seconds'))} s; aggregator peak RSS "
                  f"{_f(r.get('aggregator_peak_rss_bytes'))} B for an encrypted model of {r50['encrypted_model_bytes']:,} B. "
                  f"{r50['note']}.", ""]
    sw = r.get("shard_workload")
    if sw:
        lines += ["## Shards", "",
                  f"{sw['updates']} dense updates of {sw['params_per_update']:,} values, K = {sw['K']}; aggregator "
                  f"processes consuming, paused, workload published, resumed; clock stops when every shard committed. "
                  f"One shard {median(sw['one_shard_seconds']):.2f} s, two shards {median(sw['two_shards_seconds']):.2f} s.", ""]
    avs = r.get("async_vs_sync")
    if avs:
        lines += ["## Async vs sync", "", "```", json.dumps(avs, indent=1, default=str)[:1500], "```", ""]
    errors = {k: v for k, v in r.items() if k.endswith("_error")}
    if errors:
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in errors.items()] + [""]
    return "\n".join(lines)


def write(result: dict[str, Any], out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "latest.json", out_dir / "latest.md"
    j.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m.write_text(markdown(result) + "\n")
    return j, m


def summary_lines(r: dict[str, Any]) -> list[str]:
    vd = r["verdicts"]
    return [
        f"aggregator end to end {_f(r.get('aggregator_fold_values_per_s'))} values/s = "
        f"{_f(r.get('aggregator_vs_floor'))} of its floor {_f(r.get('aggregator_floor_values_per_s'))} (goal >= 0.5: "
        f"{vd['aggregator_vs_floor']['met']})",
        f"wire bytes / dense fp32 {_f(r.get('wire_bytes_ratio_vs_dense_fp32'))} (goal <= 1.0 at <= 1 AUC point: "
        f"{vd['wire_bytes_ratio_vs_dense_fp32']['met']})",
        f"site overhead {_f(r.get('site_overhead_fraction'))} of training (goal <= 0.10: {vd['site_overhead_fraction']['met']})",
        f"two shards {_f(r.get('shard_speedup_2'))}x one (goal >= 1.7: {vd['shard_speedup_2']['met']})",
        f"sync / async time to target {_f(r.get('async_vs_sync_speedup'))}",
        f"CKKS {_f(r.get('ckks_bytes_per_value'))} bytes/value; dense ResNet-50 update: built in "
        f"{_f(r.get('resnet50_site_build_seconds'))} s, folded in {_f(r.get('resnet50_fold_seconds'))} s, aggregator "
        f"peak RSS {_f(r.get('aggregator_peak_rss_vs_encrypted_model'))}x the encrypted model",
        "ResNet-50 GPU training: not measured: no GPU machine was lent",
    ]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for checking the harness)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sz = Sizes.tiny() if args.quick else Sizes.full()
    if args.skip:
        sz = replace(sz, skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()))
    result = run(sz)
    j, m = write(result, args.out)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {j} and {m} in {result['total_seconds']:.0f}s")
    return 0
