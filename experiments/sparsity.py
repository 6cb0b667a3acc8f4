"""Sparsity that pays (#13 item 4): test AUC against versions for top-k levels, at the
reproduction's FL + DP settings, and the default top-k picked from it.

Each level runs the reproduction's FL + DP arm (:class:`fedmq.experiments.reproduce.ReproduceConfig`:
same sites, DP budget, rounds, K, EMA, CKKS preset) through the in-process federation
(the shipped trainer, update builder with error feedback, CKKS path and AggregatorEngine);
only ``sparsity_mode``/``topk_fraction`` change. Level 1.0 is dense. Wire bytes are the
encoded, signed update chunks a site sends, per update, against the dense float32 update
(4 bytes x parameters).

The pick rule (:func:`pick_default`): the smallest wire bytes whose mean **validation** AUC is
within ``tolerance`` (1 point) of dense; the test AUC is reported beside it, never used to pick.
``run_sparsity`` writes ``sparsity.json`` and ``sparsity.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: the levels the issue asks for; 1.0 = dense (every block, no residual)
LEVELS = (1.0, 0.5, 0.25, 0.1)
#: AUC points a sparser level may lose against dense and still be picked
TOLERANCE = 0.01


def _fed_kwargs(level: float) -> dict[str, Any]:
    return {"sparsity_mode": "dense", "topk_fraction": 1.0} if level >= 1.0 else {
        "sparsity_mode": "topk", "topk_fraction": level}


def pick_default(levels: list[dict], *, tolerance: float = TOLERANCE, key: str = "val_auc_mean") -> float:
    """The level with the fewest wire bytes per update whose ``key`` AUC is within ``tolerance``
    of dense (level 1.0). Dense always qualifies, so a pick always exists."""
    dense = next(r for r in levels if r["topk_fraction"] >= 1.0)
    ok = [r for r in levels if r[key] >= dense[key] - tolerance]
    return float(min(ok, key=lambda r: r["bytes_per_update"])["topk_fraction"])


def summarize(per_level: dict[float, list[dict]], params: int, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Per-level means over seeds, wire ratios and the pick (validation rule) from per-seed rows."""
    dense_fp32 = 4 * params
    levels = []
    for level, rows in sorted(per_level.items(), reverse=True):
        bpu = float(np.mean([r["bytes_up"] / max(r["updates"], 1) for r in rows]))
        levels.append({
            "topk_fraction": level,
            "sparsity_mode": "dense" if level >= 1.0 else "topk",
            "seeds": [r["seed"] for r in rows],
            "test_auc_mean": float(np.mean([r["test_auc"] for r in rows])),
            "test_auc_per_seed": [r["test_auc"] for r in rows],
            "val_auc_mean": float(np.mean([r["val_auc"] for r in rows])),
            "val_auc_per_seed": [r["val_auc"] for r in rows],
            "bytes_per_update": bpu,
            "ratio_vs_dense_fp32": bpu / dense_fp32,
            "epsilon_spent_max": max((r["epsilon_max"] or 0.0) for r in rows),
            # mean test / val AUC of x_v per version over seeds (the curve the plot shows)
            "curve": _mean_curve([r["history"] for r in rows]),
        })
    dense = levels[0]
    for r in levels:
        r["test_auc_cost_points"] = 100 * (dense["test_auc_mean"] - r["test_auc_mean"])
        r["val_auc_cost_points"] = 100 * (dense["val_auc_mean"] - r["val_auc_mean"])
    pick = pick_default(levels, tolerance=tolerance)
    picked = next(r for r in levels if r["topk_fraction"] == pick)
    return {
        "params": params,
        "dense_fp32_bytes": dense_fp32,
        "levels": levels,
        "tolerance_points": 100 * tolerance,
        "pick_rule": (f"fewest wire bytes per update whose mean validation AUC is within {100 * tolerance:g} point(s) "
                      "of dense (top-k 1.0); test AUC reported, never used to pick"),
        "picked_topk_fraction": pick,
        "picked_ratio_vs_dense_fp32": picked["ratio_vs_dense_fp32"],
        "picked_test_auc_cost_points": picked["test_auc_cost_points"],
        "goal": {"ratio_max": 1.0, "ratio_goal": 0.25, "auc_points_max": 1.0,
                 "met": picked["ratio_vs_dense_fp32"] <= 1.0 and picked["test_auc_cost_points"] <= 1.0},
    }


def _mean_curve(histories: list[list[dict]]) -> list[dict]:
    by_v: dict[int, list[dict]] = {}
    for h in histories:
        for p in h:
            by_v.setdefault(p["version"], []).append(p)
    return [{"version": v, "test_auc": float(np.mean([p["test_auc"] for p in ps])),
             "val_auc": float(np.mean([p["val_auc"] for p in ps])), "n": len(ps)}
            for v, ps in sorted(by_v.items())]


def write_plot(summary: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in summary["levels"]:
        c = r["curve"]
        label = (f"top-k {r['topk_fraction']:g} ({r['ratio_vs_dense_fp32']:.2f}x fp32, "
                 f"test {r['test_auc_mean']:.3f})")
        axes[0].plot([p["version"] for p in c], [p["test_auc"] for p in c], marker=".", label=label)
    axes[0].set_xlabel("global version")
    axes[0].set_ylabel("test AUC of x_v (mean over seeds)")
    axes[0].set_ylim(0.5, 1.0)
    axes[0].set_title("FL + DP (epsilon 1.2/site), error feedback")
    axes[0].legend(fontsize=7, loc="lower right")
    xs = [r["ratio_vs_dense_fp32"] for r in summary["levels"]]
    axes[1].plot(xs, [r["test_auc_mean"] for r in summary["levels"]], "o-", label="test (selected version)")
    axes[1].plot(xs, [r["val_auc_mean"] for r in summary["levels"]], "s--", label="validation")
    for r in summary["levels"]:
        axes[1].annotate(f"{r['topk_fraction']:g}", (r["ratio_vs_dense_fp32"], r["test_auc_mean"]),
                         textcoords="offset points", xytext=(4, -10), fontsize=8)
    axes[1].axvline(1.0, color="k", ls=":", lw=1)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("wire bytes per update / dense float32")
    axes[1].set_ylabel("AUC (mean over seeds)")
    axes[1].set_title(f"picked: top-k {summary['picked_topk_fraction']:g}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    p = out / "sparsity.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def run_sparsity(cfg, out_dir: Path | str, *, levels: tuple[float, ...] = LEVELS, log=print) -> dict:
    """Run the FL + DP arm of ``cfg`` (a ReproduceConfig) for every level x seed; write
    ``sparsity.json`` (re-written after every run, so a stopped sweep keeps what it measured)."""
    import torch

    from fedmq.experiments.datasets import md5_of
    from fedmq.experiments.reproduce import npz_path
    from fedmq.experiments.simulation import load_federation_data, run_federation_sim
    from fedmq.site_agent.model_state import FederatedModel

    torch.set_num_threads(cfg.threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = npz_path(cfg)
    params = int(FederatedModel.create(cfg.preset, 0).layout.size)
    per_level: dict[float, list[dict]] = {lv: [] for lv in levels}
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    for seed in range(cfg.seeds):
        data = load_federation_data(npz, n_sites=cfg.n_sites, alpha=cfg.alpha, val_fraction=cfg.val_fraction, seed=seed)
        for level in levels:
            fed = cfg.federation(rounds=cfg.rounds_dp, **_fed_kwargs(level))
            t = time.perf_counter()
            r = run_federation_sim(data, cfg.local_dp, fed, seed=seed, arm=f"fl_dp_topk{level:g}")
            row = {"seed": seed, "test_auc": r.test_auc, "val_auc": r.val_auc, "best_version": r.best_version,
                   "selected_model": r.selected_model, "bytes_up": r.bytes_up, "updates": r.updates,
                   "epsilon_max": max(r.epsilon_spent) if r.epsilon_spent else None,
                   "history": [vars(p) for p in r.history], "wall_seconds": time.perf_counter() - t}
            per_level[level].append(row)
            log(f"seed {seed} top-k {level:<4g} test AUC {r.test_auc:.4f} (val {r.val_auc:.4f}, v{r.best_version}"
                f"{' ema' if r.selected_model == 'ema' else ''}) {r.bytes_up / max(r.updates, 1) / 1e3:.1f} kB/update "
                f"({r.bytes_up / max(r.updates, 1) / (4 * params):.3f}x fp32) eps {row['epsilon_max']} "
                f"{row['wall_seconds']:.0f}s")
            done = {lv: rows for lv, rows in per_level.items() if rows}
            if any(lv >= 1.0 for lv in done):
                result = {
                    "dataset": cfg.dataset, "dataset_md5": md5_of(npz), "arm": "fl_dp",
                    "settings": json.loads(cfg.model_dump_json()), "levels_requested": list(levels),
                    "seeds_run": sorted({row["seed"] for rows in done.values() for row in rows}),
                    **summarize(done, params),
                    "per_seed": {str(lv): [{k: v for k, v in row.items() if k != "history"} for row in rows]
                                 for lv, rows in done.items()},
                    "total_wall_seconds": time.perf_counter() - t0,
                }
                (out / "sparsity.json").write_text(json.dumps(result, indent=2))
    write_plot(result, out)
    log(f"picked top-k {result['picked_topk_fraction']:g} ({result['picked_ratio_vs_dense_fp32']:.3f}x dense fp32, "
        f"test AUC cost {result['picked_test_auc_cost_points']:.2f} points); wrote {out / 'sparsity.json'}")
    return result
