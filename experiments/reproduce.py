"""Reproduce the reference study: centralized vs FL vs FL + DP, and async vs sync with a straggler.

All defaults live in :class:`ReproduceConfig` (chosen on the sites' validation splits only,
see docs/reproduction.md). ``run_reproduce`` writes ``results.json``, ``report.md`` and PNG
plots into the output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedmq.experiments.simulation import (
    FederationData,
    FederationSettings,
    LocalSettings,
    RunResult,
    bootstrap_auc_ci,
    load_federation_data,
    run_centralized,
    run_federation_sim,
)
from fedmq.experiments.datasets import md5_of
from fedmq.experiments.defaults import (
    CLIP_NORM,
    MOMENTUM,
    async_buffer_size,
    model_preset,
    dp_federation_lr_for_sizes,
    ema_beta,
    expected_versions,
)
from fedmq.shared.ckks import DEFAULT_PRESET as DEFAULT_CKKS_PRESET
from fedmq.site_agent.settings import DEFAULT_TOPK_FRACTION

logger = logging.getLogger(__name__)

ARMS = ("centralized", "centralized_dp", "fl", "fl_dp")

#: published numbers the report sets ours beside
REFERENCE = {
    "study": {"centralized": 0.923, "fl": 0.891, "fl_dp": 0.874, "fl_ratio": 0.965, "fl_dp_ratio": 0.947, "epsilon": 1.2},
    "medmnist_resnet18_28_auc": 0.944,
}
TARGETS = {"fl_ratio": 0.98, "fl_dp_ratio": 0.95, "centralized_auc": 0.95}


class ReproduceConfig(BaseModel):
    """Every setting of the reproduction in one place; ``quick()`` is the CI-sized variant."""

    model_config = ConfigDict(extra="forbid")

    #: a name in experiments.datasets.REGISTRY (file and MD5 checked)
    dataset: str = "pneumoniamnist"
    data_root: Path | None = None
    #: an npz in the official MedMNIST format outside the registry (tests, private exports):
    #: run as given, its MD5 recorded in results.json, not checked
    npz: Path | None = None
    #: the goals are judged on 5 seeds (issue 14); --seeds N for fewer
    seeds: int = Field(5, ge=1)
    quick: bool = False
    #: torch intra-op threads; 1 is fastest for the 28 px presets on a busy 2-core machine
    threads: int = Field(1, ge=1)
    #: seeds run in parallel processes (each with ``threads`` torch threads)
    jobs: int = Field(1, ge=1)
    n_boot: int = Field(1000, ge=50)

    # federation topology (the FL arms use synchronous FedAvg, K = number of sites)
    #: the model of every arm: the rule (defaults.model_preset), scatternet
    preset: Literal["small_cnn", "scatternet", "resnet18", "resnet50"] = model_preset()
    n_sites: int = 3
    alpha: float = 0.5
    val_fraction: float = 0.15
    fl_mode: Literal["sync", "async"] = "sync"
    buffer_size: int = 2
    server_lr: float = 1.0
    weight_quantum: int = 64
    topk_fraction: float = DEFAULT_TOPK_FRACTION
    ckks_preset: str = DEFAULT_CKKS_PRESET
    #: key-holder EMA of the global versions (post-processing, no privacy cost), all arms;
    #: selection on validation picks between x_v and ema_v. "rule" = ``defaults.ema_beta`` of the
    #: arm's versions (0.667 at 20 rounds); a number overrides it; None = off.
    ema_beta: float | Literal["rule"] | None = "rule"

    # non-DP arms (centralized, fl): local training and rounds (= FL updates per site)
    local: LocalSettings = LocalSettings(lr=2e-3, optimizer="adam", batch_size=64, local_epochs=1)
    rounds: int = 20
    # DP arms (centralized_dp, fl_dp): the same settings for both; epsilon per site over all rounds
    #: ``lr`` here is only a placeholder when ``dp_lr`` is "rule" (the default): each seed's DP arms
    #: then take ``defaults.dp_federation_lr_for_sizes`` of that seed's sites (FL + DP: the
    #: noisiest site's noise multiplier; centralized DP: the one site holding all of them)
    local_dp: LocalSettings = LocalSettings(
        lr=0.02, optimizer="sgd", momentum=MOMENTUM, batch_size=128, local_epochs=1, dp=True, target_epsilon=1.2,
        max_grad_norm=CLIP_NORM,
    )
    dp_lr: float | Literal["rule"] = "rule"
    rounds_dp: int = 20

    # async vs sync: one hospital `slow_factor` x slower, time for the validation AUC to reach the target
    #: the K rule (experiments/defaults.py); these time-to-target runs use the non-DP settings
    async_buffer_size: int = async_buffer_size(3, dp=False)
    slow_site: int = 2
    slow_factor: float = 4.0
    target_val_auc: float = 0.98
    #: each site may contribute up to this many updates in the time-to-target runs
    async_max_rounds: int = 30
    #: "steps" = simulated seconds from optimizer steps (robust on a shared CPU); "measured" = real compute
    clock: Literal["measured", "steps"] = "steps"

    @classmethod
    def quick_config(cls, **overrides) -> "ReproduceConfig":
        base = dict(quick=True, seeds=1, rounds=3, rounds_dp=3, n_boot=200, async_max_rounds=5, target_val_auc=0.95)
        base.update(overrides)
        return cls(**base)

    def ema_for(self, rounds: int) -> float | None:
        """The EMA coefficient of an arm of ``rounds`` rounds: the rule of its versions (the FL
        arms are synchronous, one version per round; a centralized round is one version too)."""
        if self.ema_beta != "rule":
            return self.ema_beta
        beta = ema_beta(expected_versions(rounds, self.n_sites, self.n_sites))
        return beta if beta > 0 else None  # a run of 1-2 versions: nothing to average

    def dp_settings(self, n_train: list[int]) -> LocalSettings:
        """The DP arms' local settings for a federation whose sites hold ``n_train`` training
        images (one entry: the centralized trainer holding them all)."""
        if self.dp_lr != "rule":
            return self.local_dp.model_copy(update={"lr": float(self.dp_lr)})
        lr = dp_federation_lr_for_sizes(n_train, batch_size=self.local_dp.batch_size, rounds=self.rounds_dp,
                                        epsilon=self.local_dp.target_epsilon, local_epochs=self.local_dp.local_epochs,
                                        max_grad_norm=self.local_dp.max_grad_norm)
        return self.local_dp.model_copy(update={"lr": lr})

    def federation(self, **kw) -> FederationSettings:
        base = dict(
            preset=self.preset, n_sites=self.n_sites, alpha=self.alpha, val_fraction=self.val_fraction,
            mode=self.fl_mode, buffer_size=self.buffer_size, server_lr=self.server_lr,
            weight_quantum=self.weight_quantum, topk_fraction=self.topk_fraction,
            ckks_preset=self.ckks_preset, ema_beta=self.ema_for(kw.get("rounds", self.rounds)),
        )
        base.update(kw)
        return FederationSettings(**base)


def npz_path(cfg: ReproduceConfig) -> Path:
    """The dataset file: ``cfg.npz`` when given (explicitly, unverified), else the registered
    ``cfg.dataset`` under the data root, checked against its published MD5 (experiments.datasets)."""
    from fedmq.experiments.datasets import DatasetError, resolve, task

    if cfg.npz is not None:
        if not Path(cfg.npz).is_file():
            raise DatasetError(f"{cfg.npz} not found")
        return Path(cfg.npz)
    task(cfg.dataset)  # an unknown name is refused before the data root is looked for
    root = cfg.data_root or (Path(os.environ["FEDMQ_DATA_ROOT"]) if os.environ.get("FEDMQ_DATA_ROOT") else None)
    if root is None:
        raise DatasetError("no data root: pass --data-root or set FEDMQ_DATA_ROOT")
    return resolve(cfg.dataset, Path(root))


def _measure_seconds_per_step(data: FederationData, cfg: ReproduceConfig) -> float:
    """Median seconds per non-DP optimizer step of one site (sets the simulated clock's unit)."""
    from fedmq.site_agent.training import LocalTrainer

    from fedmq.experiments.simulation import training_config

    site = data.sites[0]
    tc = training_config(cfg.local, preset=cfg.preset, seed=0, planned_rounds=1, local_steps=10)
    trainer = LocalTrainer(tc, None)
    samples = []
    for r in range(3):
        res = trainer.train_round(None, site.X_train, site.y_train, round_index=r)
        samples.append(res.timings["total_s"] / res.steps)
    return float(np.median(samples))


def seed_t_interval(values: list[float], level: float = 0.95) -> list[float] | None:
    """Student-t interval of the mean over seeds (the seed-to-seed spread: partition, noise,
    sampling), beside ``auc_ci`` (the bootstrap over test images). None for one seed."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    m, se = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
    h = float(t.ppf(0.5 + level / 2, len(values) - 1)) * se
    return [m - h, m + h]


def _load_split_y_test(npz: Path) -> np.ndarray:
    from fedmq.experiments.simulation import _load_split_cached

    return _load_split_cached(str(npz), "test")[1].numpy()


def _ratios(arms: dict) -> dict[str, float]:
    c = arms["centralized"]["auc_mean"]
    return {"fl_ratio": arms["fl"]["auc_mean"] / c, "fl_dp_ratio": arms["fl_dp"]["auc_mean"] / c}


def _arm_summary(runs: list[RunResult], y_test: np.ndarray, cfg: ReproduceConfig) -> dict:
    aucs = [r.test_auc for r in runs]
    lo, hi = bootstrap_auc_ci(y_test, [r.test_probs for r in runs], n_boot=cfg.n_boot)
    return {
        "auc_mean": float(np.mean(aucs)),
        "auc_ci": [lo, hi],
        "auc_std_across_seeds": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
        "auc_ci_seeds": seed_t_interval(aucs),
        "auc_per_seed": aucs,
        "val_auc_mean": float(np.mean([r.val_auc for r in runs])),
        "acc_mean": float(np.mean([r.test_accuracy for r in runs])),
        "acc_per_seed": [r.test_accuracy for r in runs],
        "wall_seconds": float(np.mean([r.wall_seconds for r in runs])),
        "sim_seconds": float(np.mean([r.sim_seconds for r in runs])),
        "bytes_sent": int(np.mean([r.bytes_sent for r in runs])),
        "bytes_up": int(np.mean([r.bytes_up for r in runs])),
        "bytes_down": int(np.mean([r.bytes_down for r in runs])),
        "bytes_estimated": bool(runs[0].bytes_estimated),
        "optimizer_steps": int(np.mean([r.optimizer_steps for r in runs])),
        "epsilon_spent_max": max((max(r.epsilon_spent) for r in runs if r.epsilon_spent), default=None),
        "noise_multiplier": runs[0].noise_multiplier,
        "runs": [r.summary() for r in runs],
    }


def _async_vs_sync_sim(data: FederationData, cfg: ReproduceConfig, sps: float, log) -> dict:
    slow = [1.0] * cfg.n_sites
    slow[cfg.slow_site] = cfg.slow_factor
    common = dict(
        rounds=cfg.async_max_rounds, slowdowns=tuple(slow), stop_at_val_auc=cfg.target_val_auc,
        clock=cfg.clock, seconds_per_step=sps,
    )
    out = {}
    for mode in ("async", "sync"):
        fed = cfg.federation(mode=mode, buffer_size=cfg.async_buffer_size, **common)
        t = time.perf_counter()
        r = run_federation_sim(data, cfg.local, fed, seed=0, arm=f"fl_{mode}_straggler")
        log(f"  {mode}: val AUC {r.val_auc:.4f} after {r.sim_seconds:.1f} simulated s ({time.perf_counter() - t:.0f} s wall)")
        out[mode] = r
    return {
        "source": "simulation",
        "clock": cfg.clock,
        "seconds_per_step": sps,
        "target_auc": cfg.target_val_auc,
        "target_on": "val",
        "slow_site": data.sites[cfg.slow_site].name,
        "slow_factor": cfg.slow_factor,
        "async_buffer_size": cfg.async_buffer_size,
        "async_seconds_to_target": out["async"].seconds_to_val_auc(cfg.target_val_auc),
        "sync_seconds_to_target": out["sync"].seconds_to_val_auc(cfg.target_val_auc),
        "curves": {m: [vars(p) for p in r.history] for m, r in out.items()},
        "updates": {m: r.updates for m, r in out.items()},
    }


def _line(seed: int, arm: str, r: RunResult) -> str:
    return (f"seed {seed} {arm:15s} test AUC {r.test_auc:.4f} (val {r.val_auc:.4f}, v{r.best_version}"
            f"{' ema' if r.selected_model == 'ema' else ''}) "
            f"acc {r.test_accuracy:.4f} {r.wall_seconds:.0f}s {r.bytes_sent / 1e6:.1f} MB"
            + (f" eps {max(r.epsilon_spent):.3f}" if r.epsilon_spent else ""))


def _run_seed(cfg: ReproduceConfig, npz: Path, seed: int, log) -> dict[str, RunResult]:
    """The four arms for one seed (its own Dirichlet partition, local splits, DP noise and sampling)."""
    import torch

    torch.set_num_threads(cfg.threads)
    data = load_federation_data(npz, n_sites=cfg.n_sites, alpha=cfg.alpha, val_fraction=cfg.val_fraction, seed=seed)
    fed = cfg.federation(rounds=cfg.rounds)
    fed_dp = cfg.federation(rounds=cfg.rounds_dp)
    sizes = [len(site.X_train) for site in data.sites]
    local_fl_dp, local_c_dp = cfg.dp_settings(sizes), cfg.dp_settings([sum(sizes)])
    if log is not None:
        log(f"seed {seed}: training images per site {sizes}; DP lr (rule) FL + DP {local_fl_dp.lr:.4f}, "
            f"centralized DP {local_c_dp.lr:.4f}; EMA beta {fed.ema_beta}")
    plan = [
        ("centralized", cfg.local, lambda: run_centralized(data, cfg.local, fed, seed=seed, arm="centralized")),
        ("centralized_dp", local_c_dp,
         lambda: run_centralized(data, local_c_dp, fed_dp, seed=seed, arm="centralized_dp")),
        ("fl", cfg.local, lambda: run_federation_sim(data, cfg.local, fed, seed=seed, arm="fl")),
        ("fl_dp", local_fl_dp, lambda: run_federation_sim(data, local_fl_dp, fed_dp, seed=seed, arm="fl_dp")),
    ]
    out = {}
    for arm, local, fn in plan:
        out[arm] = r = fn()
        r.lr = local.lr
        if log is not None:
            log(_line(seed, arm, r))
    return out


def run_reproduce(cfg: ReproduceConfig, out_dir: Path | str, log=print) -> dict:
    import torch

    from fedmq.experiments.report_reproduce import write_plots, write_report

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = npz_path(cfg)
    t_all = time.perf_counter()
    runs: dict[str, list[RunResult]] = {a: [] for a in ARMS}
    y_test = _load_split_y_test(npz)
    landed: dict[int, dict[str, RunResult]] = {}

    def seed_landed(seed: int, res: dict[str, RunResult]) -> None:
        """Keep what a long run has measured: results.partial.json after every seed."""
        landed[seed] = res
        arms_p = {a: _arm_summary([landed[s][a] for s in sorted(landed)], y_test, cfg) for a in ARMS}
        partial = {"partial": True, "seeds": sorted(landed), "arms": arms_p, "ratios": _ratios(arms_p)}
        (out / "results.partial.json").write_text(json.dumps(partial, indent=2, default=_json_default))

    if cfg.jobs > 1 and cfg.seeds > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, cfg.seeds), mp_context=ctx) as pool:
            futures = {pool.submit(_run_seed, cfg, npz, seed, None): seed for seed in range(cfg.seeds)}
            per_seed: dict[int, dict[str, RunResult]] = {}
            for f in as_completed(futures):  # log each seed as it lands: a long run shows progress
                seed = futures[f]
                per_seed[seed] = f.result()
                for arm, r in per_seed[seed].items():
                    log(_line(seed, arm, r))
                seed_landed(seed, per_seed[seed])
        for seed in sorted(per_seed):
            for arm, r in per_seed[seed].items():
                runs[arm].append(r)
    else:
        for seed in range(cfg.seeds):
            res = _run_seed(cfg, npz, seed, log)
            for arm, r in res.items():
                runs[arm].append(r)
            seed_landed(seed, res)
    data = load_federation_data(npz, n_sites=cfg.n_sites, alpha=cfg.alpha, val_fraction=cfg.val_fraction, seed=0)
    y_test = data.y_test.numpy()
    log(f"{cfg.dataset}: sites (train/val, positives) "
        + ", ".join(f"{s.name} {len(s.X_train)}/{len(s.X_val)} ({int(s.y_train.sum())})" for s in data.sites)
        + f"; test {len(data.X_test)} (seed 0 partition)")
    arms = {a: _arm_summary(runs[a], y_test, cfg) for a in ARMS}

    log("async vs sync (one hospital %.0fx slower)" % cfg.slow_factor)
    # the simulation's clock here; on real processes: ``fedmq experiment async-vs-sync``
    # (experiments/async_vs_sync.py), which replaces this entry with "source": "processes"
    avs = _async_vs_sync_sim(data, cfg, _measure_seconds_per_step(data, cfg), log)

    c = arms["centralized"]["auc_mean"]
    ratios = _ratios(arms)
    targets = {
        "centralized_auc": {"value": c, "target": TARGETS["centralized_auc"], "met": c >= TARGETS["centralized_auc"]},
        "fl_ratio": {"value": ratios["fl_ratio"], "target": TARGETS["fl_ratio"], "met": ratios["fl_ratio"] >= TARGETS["fl_ratio"]},
        "fl_dp_ratio": {"value": ratios["fl_dp_ratio"], "target": TARGETS["fl_dp_ratio"],
                        "met": ratios["fl_dp_ratio"] >= TARGETS["fl_dp_ratio"]},
    }
    results = {
        "dataset": cfg.dataset if cfg.npz is None else f"file:{Path(cfg.npz).name}",
        "dataset_md5": md5_of(npz),
        "quick": cfg.quick,
        "seeds": list(range(cfg.seeds)),
        "settings": json.loads(cfg.model_dump_json()),
        "arms": arms,
        "ratios": ratios,
        "targets": targets,
        "async_vs_sync": avs,
        "reference": REFERENCE,
        "total_wall_seconds": time.perf_counter() - t_all,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": cfg.threads},
        "multi_class_policy": "refused: the model has one logit; binary MedMNIST 2D sets only",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
    write_plots(results, out)
    write_report(results, out)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'} in {results['total_wall_seconds']:.0f}s")
    return results


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serializable: {type(o)}")
