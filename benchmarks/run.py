"""The *run* half of ``make bench`` (``python -m benchmarks``): every section measures and
returns figures; ``benchmarks.judge`` compares them with ``benchmarks.goals`` and
``benchmarks.report`` writes them down.

Every figure is the median of repeats taken in this run on this machine; every comparison is a
ratio of two figures of this run.

Sections (each a function taking a :class:`Sizes`, so the unit tests run them tiny):

- ``fold_end_to_end``: encrypted values folded per second, updates published to a private
  RabbitMQ node (``broker.local_node.LocalRabbitNode``) -> the real ``AggregatorService``
  consumer (decode, verify, WAL fsync, ack, deserialize, fold, commit + checkpoint, publish the
  version) -> folded into the global model; beside it the *floor* (deserialize + homomorphic add
  of the same ciphertexts, alone, right after each end-to-end run; the ratio is the median of
  the pairs) and plaintext float32 summation of the same values.
- ``wire_bytes``: bytes on the wire per update / dense float32 bytes, default site settings,
  and a table over top-k levels x CKKS presets with the AUC cost of each (short runs of the
  in-process simulation ``experiments.simulation``: the real trainer, sparsifier and fold).
- ``site_overhead``: (sparsify + encrypt + sign + publish) / local training time, per round.
- ``scaling_sites`` / ``scaling_model``: aggregator time per version vs number of publishers
  and vs model size (random deltas of the model presets' parameter counts,
  ``site_agent.models.PRESETS``).
- ``shard_speedup``: two aggregator shards (separate processes) vs one, same workload.
- ``signatures`` (``benchmarks.signatures``) and ``resnet50`` (``benchmarks.resnet50``).
- ``async_vs_sync``: time to a target AUC, sync over async, with one 4x straggler. Its only
  input is the dataset: it never reads an earlier run's results.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.goals import goal_texts
from benchmarks.harness import (
    MAX_MESSAGE_BYTES, AggThread, agg_settings, block_wire_bytes, build, consumers, data_npz, declare_all,
    engine_version_seconds, fresh_url, make_keys, median, mem_available, private_broker, publish, spawn_shard,
    status_version, wait_for,
)
from benchmarks.resnet50 import resnet50_scale
from benchmarks.signatures import signature_costs
from fedmq.shared.ckks import DEFAULT_PRESET, PRESETS, get_preset
from fedmq.site_agent.models import PRESETS as MODEL_PRESETS

SLOTS = get_preset(DEFAULT_PRESET).block_size

log = logging.getLogger("benchmarks")


def model_params(preset: str) -> int:
    """A model preset's parameter count: the one registry, ``fedmq.site_agent.models.PRESETS``."""
    return MODEL_PRESETS[preset].n_params


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark runs. ``full()`` for ``make bench``; ``tiny()`` for unit tests."""

    repeats: int = 3
    #: end-to-end fold runs, each paired with its floor runs (the ratio is their median)
    fold_repeats: int = 5
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
    resnet50_params: int = MODEL_PRESETS["resnet50"].n_params
    skip: tuple[str, ...] = ()

    @classmethod
    def full(cls) -> "Sizes":
        return cls()

    @classmethod
    def tiny(cls) -> "Sizes":
        return cls(
            repeats=1, fold_repeats=1, fold_params=4 * SLOTS, fold_updates=2, fold_buffer=2, site_counts=(1, 2), site_params=2 * SLOTS,
            model_presets=("small_cnn",), memory_budget_bytes=1 << 30, shard_params=4 * SLOTS, shard_updates=2,
            overhead_rounds=1, overhead_train_samples=64, auc_levels=(1.0, 0.5), auc_presets=(DEFAULT_PRESET,),
            auc_rounds=1, auc_train_per_site=48, avs_time_limit_s=30.0, resnet50_params=160 * SLOTS,
        )



# ----------------------------------------------------------------------------- 1. fold end to end + floor


def fold_end_to_end(sz: Sizes, urls: Callable[[], str], tmp: Path) -> dict[str, Any]:
    """Updates published to the broker first; then the aggregator consumer is started and timed from
    consuming (ready) to the last version committed and published."""
    from fedmq.aggregator import fold as foldmod
    from fedmq.shared.ckks import load_ciphertext
    from fedmq.shared.codec import decode_update_chunk

    keys = make_keys(tmp / "fold")
    rng = np.random.default_rng(0)
    n_up, P, K = sz.fold_updates, sz.fold_params, sz.fold_buffer
    updates = [build(keys, f"site-{i % 8}", i // 8 + 1, rng.uniform(-0.5, 0.5, P))[0] for i in range(n_up)]
    values = n_up * (-(-P // SLOTS)) * SLOTS  # encrypted values (full blocks) folded
    # the floor: deserialize + homomorphic add of the same ciphertexts, alone (m = 1) and with
    # the weight units the aggregator used (double-and-add)
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

    # each end-to-end run is followed at once by its floor runs, and the ratio is the median of
    # these pairs: this machine's speed drifts by up to 1.5x within a minute (other tenants),
    # which made a ratio of two medians taken a minute apart swing by 0.1
    e2e, pub, floor1, floor_m = [], [], [], []
    units = 1
    for r in range(sz.fold_repeats):
        url = urls()
        declare_all(url)
        pub.append(publish(url, [b for u in updates for b in u]))
        settings = agg_settings(keys, tmp / f"fold-state-{r}", amqp_url=url, buffer_size=K)
        with AggThread(settings) as agg:
            t0 = time.perf_counter()
            wait_for(lambda: agg.service.engine.updates_folded_total >= n_up and agg.service.engine.version >= n_up // K,
                  600, "fold end to end")
            e2e.append(time.perf_counter() - t0)
            units = max([int(i.last_weight_units or 1) for i in agg.service.engine.sites.values()] or [1])
        floor1.append(floor_once(1))
        floor_m.append(floor_once(units))
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
        "aggregator_vs_floor": median([f / e for f, e in zip(floor1, e2e)]),
        "aggregator_vs_floor_same_units": median([f / e for f, e in zip(floor_m, e2e)]),
        "fp32_sum_vs_aggregator": (values / median(fp32)) / e2e_rate,
        "fold_workload": {"updates": n_up, "params_per_update": P, "encrypted_values": values, "buffer_size": K,
                          "weight_units": units, "bytes_published": sum(len(b) for u in updates for b in u),
                          "end_to_end_seconds": e2e, "publish_seconds": pub, "floor_seconds": floor1,
                          "floor_same_units_seconds": floor_m},
    }


# ----------------------------------------------------------------------------- 2. wire bytes + AUC table


def wire_bytes(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """Bytes on the wire per update / dense float32 bytes, for the small_cnn size, default site settings
    (top-k 0.5, the default CKKS preset) and over top-k levels x presets."""
    from fedmq.site_agent.settings import SiteSettings

    defaults = SiteSettings.model_fields
    mode, frac = defaults["sparsity_mode"].default, defaults["topk_fraction"].default
    P = model_params("small_cnn")
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


def auc_table(sz: Sizes, tmp: Path, wire: dict[str, Any]) -> dict[str, Any]:
    """AUC cost of each top-k level (default CKKS preset) and each CKKS preset (at the default
    top-k), vs dense FedAvg: short in-process simulations of the shipped engine (always encrypted)."""
    from fedmq.experiments.simulation import FederationSettings, LocalSettings, load_federation_data, run_federation_sim

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
        "auc_method": (f"fedmq.experiments.simulation.run_federation_sim: 3 sites (Dirichlet 0.5), sync FedAvg, "
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
    from fedmq.experiments.simulation import load_federation_data
    from fedmq.shared.codec import encode_update_chunk
    from fedmq.site_agent.model_state import FederatedModel
    from fedmq.site_agent.runtime import training_config
    from fedmq.site_agent.settings import SiteSettings
    from fedmq.site_agent.training import LocalTrainer
    from fedmq.site_agent.update_builder import UpdateIdentity, build_update

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
                             fm.layout.fingerprint, keys.site_key("hospital-1"), mode=settings.sparsity_mode,
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


def scaling_sites(sz: Sizes, tmp: Path) -> dict[str, Any]:
    keys = make_keys(tmp / "scale-sites")
    rng = np.random.default_rng(2)
    P = sz.site_params
    nmax = max(sz.site_counts)
    ups = [build(keys, f"site-{i}", 1, rng.uniform(-0.5, 0.5, P))[0] for i in range(nmax)]
    rows = []
    for n in sz.site_counts:
        bodies = [b for u in ups[:n] for b in u]
        secs = [engine_version_seconds(keys, tmp / f"scale-sites-{n}-{r}", bodies, n) for r in range(sz.repeats)]
        s = median(secs)
        rows.append({"sites": n, "seconds_per_version": s, "values_per_s": n * P / s,
                     "seconds_per_update": s / n})
    return {"scaling_sites": {"params_per_update": P, "mode": "dense", "K": "= number of sites (one version)",
                              "rows": rows}}


def scaling_model(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """One update per preset size, random delta; dense where ~5 copies of the ciphertexts (update
    chunks, WAL, deserialized buffer, D, D's serialized cache) fit half the available memory."""
    import gc

    keys = make_keys(tmp / "scale-model")
    block_bytes = block_wire_bytes(keys)  # measured with the default preset, not a constant
    budget = sz.memory_budget_bytes or mem_available() // 2
    rows = []
    for preset in sz.model_presets:
        P = model_params(preset)
        blocks = -(-P // SLOTS)
        dense_bytes = round(blocks * block_bytes)
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
        secs = [engine_version_seconds(keys, tmp / f"scale-model-{preset}-{r}", bodies, 1) for r in range(reps)]
        rows.append({"model": preset, "params": P, "blocks": blocks, "mode": "dense" if dense else f"topk {frac}",
                     "blocks_sent": len(built.sent_indices), "update_bytes": nbytes,
                     "dense_update_bytes_estimate": dense_bytes, "site_build_seconds": build_s,
                     "aggregator_seconds_per_version": median(secs), "repeats": reps,
                     "values_per_s": len(built.sent_indices) * SLOTS / median(secs)})
        del bodies, built
        gc.collect()
    return {"scaling_model": {"memory_budget_bytes": budget, "K": 1, "dense_block_wire_bytes": block_bytes, "rows": rows}}


# ----------------------------------------------------------------------------- 5. shard speedup


def _shard_run(keys: Any, urls: Callable[[], str], tmp: Path, bodies: list[bytes], count: int, K: int, versions: int,
               tag: str) -> float:
    """Aggregator processes started and consuming, then SIGSTOPped; the workload is published; the
    clock runs from SIGCONT to every shard's status.json reaching ``versions``."""
    from fedmq.broker.topology import updates_queue
    from fedmq.site_agent.update_builder import shard_of_encoded

    url = urls()
    declare_all(url, count)
    states = [tmp / f"shard-{tag}-{count}-{i}" for i in range(count)]
    procs = [spawn_shard(keys, url, states[i], i, count, K) for i in range(count)]
    try:
        wait_for(lambda: all(consumers(url, updates_queue(i)) >= 1 for i in range(count)), 120, "shards consuming")
        for p in procs:
            os.kill(p.pid, signal.SIGSTOP)
        publish(url, bodies, shard_of_encoded)
        t0 = time.perf_counter()
        for p in procs:
            os.kill(p.pid, signal.SIGCONT)
        wait_for(lambda: all(status_version(s) >= versions for s in states), 600, "shards folding")
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


def async_vs_sync(sz: Sizes, tmp: Path) -> dict[str, Any]:
    """A one-seed, small-slice run of ``fedmq experiment async-vs-sync`` (fedmq.experiments.async_vs_sync):
    the same code as the full comparison, no input but the dataset (the full run's figures live in
    reports/reproduce/results.json and docs/results.md, not here)."""
    from fedmq.experiments.async_vs_sync import AsyncVsSyncConfig, run
    from fedmq.experiments.federation import SiteTraining

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
            "memory_available_bytes": mem_available()}


SECTIONS = ("fold", "wire", "auc", "overhead", "signatures", "scaling_sites", "scaling_model", "resnet50", "shards",
            "async_vs_sync")


def run(sz: Sizes, *, tmp: Path | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    result: dict[str, Any] = {"machine": machine(), "sizes": asdict(sz), "goals": goal_texts(), "sections_seconds": {}}
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
    result["gpu_resnet50_training"] = {
        "measured": False,
        "reason": "not part of make bench (CPU): GPU training is measured by make bench-gpu on a CUDA machine, "
                  "written to benchmarks/results/gpu.json"}
    result["total_seconds"] = time.perf_counter() - started
    return result

