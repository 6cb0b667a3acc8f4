"""Diagnosis of a reproduction run: how far the validation-selected checkpoint lands from the
best test AUC the run passed through, per arm and seed.

Reads the ``results.json`` of ``fedmq experiment reproduce`` (nothing is re-run) and writes
``selection_gap.json`` and ``selection_gap.png`` beside it. The best test AUC is computed here
only to *explain* a miss; it is never a selection rule (that would be selecting on test).

    python -m fedmq.experiments.selection_gap reports/reproduce/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _candidates(history: list[dict]) -> list[tuple[int, str, float, float]]:
    """(version, raw|ema, val AUC, test AUC) of every selectable checkpoint (x_0 excluded)."""
    out = []
    for p in history:
        if p["version"] == 0:
            continue
        out.append((p["version"], "raw", p["val_auc"], p["test_auc"]))
        if p.get("ema_val_auc") is not None and not np.isnan(p["ema_val_auc"]):
            out.append((p["version"], "ema", p["ema_val_auc"], p["ema_test_auc"]))
    return out


def gaps(results: dict, tie: float = 0.002) -> dict:
    """Per arm: selected vs best-on-test AUC per seed, and how many checkpoints sit within ``tie``
    of the best validation AUC (validation that cannot tell them apart)."""
    out = {}
    for arm, summary in results["arms"].items():
        rows = []
        for run in summary["runs"]:
            cands = _candidates(run["history"])
            if not cands:
                continue
            best_val = max(c[2] for c in cands)
            near = [c for c in cands if c[2] >= best_val - tie]
            rows.append({
                "selected_test_auc": run["test_auc"], "selected_val_auc": run["val_auc"],
                "selected": f"v{run['best_version']}{'e' if run.get('selected_model') == 'ema' else 'r'}",
                "best_test_auc": max(c[3] for c in cands),
                "best_val_auc": best_val,
                "near_best_val": len(near),
                "near_best_val_test_range": [min(c[3] for c in near), max(c[3] for c in near)],
                "last_raw_test_auc": next(c[3] for c in reversed(cands) if c[1] == "raw"),
            })
        out[arm] = {
            "per_seed": rows,
            "selected_test_mean": float(np.mean([r["selected_test_auc"] for r in rows])),
            "best_test_mean": float(np.mean([r["best_test_auc"] for r in rows])),
            "selected_val_mean": float(np.mean([r["selected_val_auc"] for r in rows])),
            "gap_points": float(100 * np.mean([r["best_test_auc"] - r["selected_test_auc"] for r in rows])),
        }
    return {"tie": tie, "arms": out}


def write_plot(results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results["arms"])
    fig, axes = plt.subplots(1, len(arms), figsize=(4 * len(arms), 3.6), sharey=True)
    for ax, arm in zip(np.atleast_1d(axes), arms):
        for i, run in enumerate(results["arms"][arm]["runs"]):
            i = run.get("seed", i)  # results.json lists runs in seed order; arm-level files carry the seed
            h = [p for p in run["history"] if p["version"] > 0]
            color = f"C{i}"
            ax.plot([p["version"] for p in h], [p["test_auc"] for p in h], color=color, lw=1, label=f"seed {i} test")
            ax.plot([p["version"] for p in h], [p["val_auc"] for p in h], color=color, lw=1, ls=":")
            sel = next((p for p in h if p["version"] == run["best_version"]), None)
            if sel is not None:
                ax.plot([sel["version"]], [run["test_auc"]], "o", color=color, ms=6)
        ax.axhline(0.95, color="k", lw=0.8, ls="--")
        ax.set_title(arm)
        ax.set_xlabel("version / round")
        ax.set_ylim(0.75, 1.0)
    np.atleast_1d(axes)[0].set_ylabel("AUC (solid test, dotted validation; dot = selected)")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out / "selection_gap.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else "reports/reproduce/results.json")
    results = json.loads(path.read_text())
    g = gaps(results)
    (path.parent / "selection_gap.json").write_text(json.dumps(g, indent=2))
    write_plot(results, path.parent)
    for arm, a in g["arms"].items():
        print(f"{arm:15s} selected {a['selected_test_mean']:.4f} (val {a['selected_val_mean']:.4f}) "
              f"best-on-test {a['best_test_mean']:.4f} gap {a['gap_points']:.2f} points; near-best-val counts "
              + " ".join(str(r["near_best_val"]) for r in a["per_seed"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
