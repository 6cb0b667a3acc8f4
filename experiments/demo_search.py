"""The demo's federation in the simulation, to compare settings before real ``fedmq demo`` runs.

Same data as ``fedmq demo --seed S``: the Dirichlet(0.5) partition of the official train split
and each hospital's local train/validation assignment exactly as ``prepare_demo_data`` draws them
(the hospitals train on their local *train* rows only), and the demo evaluator's selection: the
official validation split, every version x_v and the EMA of versions as candidates. The sites
are the shipped ``LocalTrainer`` (DP-SGD, own ledger), the aggregator the shipped engine
(``experiments.simulation.run_federation_sim``). The demo's K = 3 async runs fold every
hospital once per version at staleness 0, which is what sync mode does here.

The official test split is scored and recorded, never used to choose (docs/results.md, "The
demo"). One JSON line per run is appended to ``--out``:

    python -m fedmq.experiments.demo_search --seeds 0 1 2 3 4 --local-steps 4 --cap-epoch --rounds 80 \
        --out reports/demo_search.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedmq.experiments.defaults import (CLIP_NORM, DP_STEP_NOISE, dp_noise_multiplier, ema_beta, federation_learning_rate,
                                       model_preset)
from fedmq.experiments.simulation import FederationData, FederationSettings, LocalSettings, SiteData, run_federation_sim
from fedmq.site_agent.data.demo_data import _local_split, dirichlet_partition, load_npz_split, load_official_split

N_SITES = 3
ALPHA = 0.5
VAL_FRACTION = 0.15


def demo_data(npz: Path, seed: int) -> FederationData:
    """The hospitals of ``fedmq demo --seed seed`` (training rows only) and the official val/test."""
    _, labels = load_npz_split(npz, "train")
    X, y = load_official_split(npz, "train")
    parts = dirichlet_partition(labels, N_SITES, ALPHA, seed)
    rng = np.random.default_rng(seed + 1)  # as prepare_demo_data draws the local splits
    sites = []
    for i, idx in enumerate(parts):
        assignment = _local_split(idx, labels, VAL_FRACTION, rng)
        tr = torch.from_numpy(np.array([j for j in idx if assignment[int(j)] == "train"], dtype=np.int64))
        sites.append(SiteData(f"hospital_{i + 1}", X[tr], y[tr], X[:0], y[:0]))
    X_val, y_val = load_official_split(npz, "val")
    X_test, y_test = load_official_split(npz, "test")
    return FederationData(sites=sites, X_val=X_val, y_val=y_val, X_test=X_test, y_test=y_test, dataset="pneumoniamnist")


def run(npz: Path, seed: int, args: argparse.Namespace) -> dict:
    data = demo_data(npz, seed)
    sizes = [len(s.X_train) for s in data.sites]
    steps = {s.name: (min(args.local_steps, math.ceil(len(s.X_train) / args.batch)) if args.cap_epoch else args.local_steps)
             for s in data.sites} if args.local_steps else {}
    sigmas = {s.name: dp_noise_multiplier(len(s.X_train), batch_size=args.batch, rounds=args.rounds, epsilon=1.2,
                                          local_steps=steps.get(s.name)) for s in data.sites}
    if args.lr_rule == "weighted":
        # the noise multiplier of the site mix as a version sees it: sample-weighted RMS
        w = np.array(sizes, dtype=float) / sum(sizes)
        s = np.array(list(sigmas.values()))
        sigma_eff = float(np.sqrt((w ** 2 * s ** 2).sum() / (w ** 2).sum()))
        rule_lr = args.step_noise * args.batch / (sigma_eff * args.clip)
    else:
        # rounds of at most S steps (--cap-epoch): the rule's momentum correction for S, as the demo does
        round_steps = args.local_steps if (args.local_steps and args.cap_epoch and args.momentum_rule) else None
        rule_lr = next(iter(federation_learning_rate(sigmas, batch_size=args.batch, step_noise=args.step_noise,
                                                        max_grad_norm=args.clip, round_steps=round_steps,
                                                        momentum=args.momentum).values()))
    lr = args.lr or rule_lr
    local = LocalSettings(lr=lr, optimizer="sgd", momentum=args.momentum, batch_size=args.batch,
                          local_steps=args.local_steps, dp=True, target_epsilon=1.2, max_grad_norm=args.clip,
                          augmentations=args.augmentations)
    beta = args.ema if args.ema is not None else ema_beta(args.rounds)
    fed = FederationSettings(preset=args.preset, n_sites=N_SITES, alpha=ALPHA, mode="sync", rounds=args.rounds,
                             server_lr=args.server_lr, ema_beta=beta, clock="steps")
    t = time.perf_counter()
    res = run_federation_sim(data, local, fed, seed=seed, arm="demo", local_steps_by_site=steps or None)
    hist = [vars(p) for p in res.history]
    return {
        "seed": seed, "config": {k: v for k, v in vars(args).items() if k not in ("seeds", "out", "data_root")},
        "lr": lr, "sigmas": sigmas, "local_steps": steps, "sizes": sizes, "ema_beta": beta,
        "val_auc": res.val_auc, "test_auc": res.test_auc, "test_accuracy": res.test_accuracy,
        "selected": f"v{res.best_version}{'e' if res.selected_model == 'ema' else 'r'}",
        "last_val_auc": hist[-1]["val_auc"], "last_test_auc": hist[-1]["test_auc"],
        "swing": float(np.mean(np.abs(np.diff([p["val_auc"] for p in hist[len(hist) // 2:]])))),
        "epsilon": res.epsilon_spent, "steps": res.optimizer_steps, "wall_s": round(time.perf_counter() - t, 1),
        "load1": os.getloadavg()[0], "history": hist,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=None)
    ap.add_argument("--cap-epoch", action="store_true", help="local steps at most one epoch of each site")
    ap.add_argument("--clip", type=float, default=CLIP_NORM, help="clip norm C (the lr rule scales with 1 / C)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=None, help="None: the federation lr rule")
    ap.add_argument("--lr-rule", choices=["max", "weighted"], default="max")
    ap.add_argument("--step-noise", type=float, default=DP_STEP_NOISE)
    ap.add_argument("--no-momentum-rule", dest="momentum_rule", action="store_false",
                    help="with --cap-epoch: leave out the lr rule's momentum correction for S (the rule before)")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=None, help="None: the EMA rule")
    ap.add_argument("--augmentations", type=int, default=0, help="K views per example (augmentation multiplicity)")
    ap.add_argument("--preset", default=model_preset(), help="default: the demo's (experiments.defaults.model_preset)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="reports/demo_search.jsonl")
    args = ap.parse_args(argv)
    from fedmq.site_agent.cli import resolve_dataset

    torch.set_num_threads(1)
    npz = resolve_dataset("pneumoniamnist", args.data_root)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vals, tests = [], []
    for seed in args.seeds:
        r = run(npz, seed, args)
        with out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        vals.append(r["val_auc"])
        tests.append(r["test_auc"])
        print(f"[{args.tag}] seed {seed}: val {r['val_auc']:.4f} test {r['test_auc']:.4f} sel {r['selected']} "
              f"last val {r['last_val_auc']:.3f} swing {r['swing']:.3f} lr {r['lr']:.4f} "
              f"sigma {','.join(f'{v:.2f}' for v in r['sigmas'].values())} eps {max(r['epsilon']):.3f} "
              f"{r['wall_s']}s load {r['load1']:.2f}", flush=True)
    print(f"[{args.tag}] mean val {np.mean(vals):.4f} min val {min(vals):.4f} | mean test {np.mean(tests):.4f} "
          f"min test {min(tests):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
