"""Async (FedBuff) against sync (FedAvg) on real processes: ``fedmq experiment async-vs-sync``.

Each run is a private RabbitMQ node, the aggregator and ``n_sites`` site agents as separate OS
processes (``experiments.federation``), one of them ``slow_factor`` x slower in its compute
(the site agent's proportional delay inside training). Both modes get the same data
partition, model, training and DP settings and the same per-site budget (``planned_rounds``
updates at epsilon ``target_epsilon``); only the aggregator's mode differs (and K, which sync
fixes at the number of sites). The clock is the wall clock from the moment the processes
start; the target is a **test** AUC reached by a released version, as the issue asks, and it
should need at least 10 versions (``min_versions_to_target`` in the output says whether it did).

Run (a command, not a test: minutes per run, a quiet machine):

    fedmq experiment async-vs-sync --seeds 3 --target-auc 0.85

Outputs: ``<out>/async_vs_sync.json`` and ``<out>/async_vs_sync.png`` (AUC against wall-clock
seconds, both modes on one figure), and the ``async_vs_sync`` entry of
``reports/reproduce/results.json`` (created or updated; other keys kept) with
``"source": "processes"``.

The rules both arms follow (none is a number chosen on a run):

- **K** (async): ``experiments.defaults.async_buffer_size`` (n sites under DP). Sync: n sites.
- **Staleness weight** s(tau) = (1 + tau)^-0.5 (FedBuff's; the aggregator's default exponent),
  **server learning rate** 1 (a version's step is the weighted mean of its updates, as sync's),
  **max_staleness** the aggregator's shipped bound (16).
- **When a site trains**: in async each site starts its next round as soon as its update is
  published (``train_continuously``: FedBuff's clients). Without it, a fast site idled until a
  version committed, and with K = n sites every version waited for the straggler: async ran at
  sync's pace (measured: the same 3 sites, staleness 0, in every version).
- **Clocks**: from the moment the processes start (the issue's), and from the first local round
  (start-up is the same work in both modes: broker, processes, loading images, the join).
  A version's time is its release by the aggregator (its signed ``created_at``), not when the
  evaluator got round to scoring it.

Diagnostics for when async is not >= 2x sooner (``runs[*]``): versions to target, updates per
version, staleness and its weight, updates folded and refused per site, training images per
site, and where each site's time went (``anatomy``: compute and wall seconds per round, idle
seconds between rounds, busy fraction; experiments/round_anatomy.py).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fedmq.aggregator.settings import AggregatorSettings
from fedmq.experiments.defaults import async_buffer_size
from fedmq.experiments.evaluator import VersionScore
from fedmq.experiments.federation import FederationResult, FederationSpec, SiteTraining, run_federation, site_ids
from fedmq.experiments.round_anatomy import anatomy

#: a in s(tau) = (1 + tau)^-a: the aggregator's own default, which the runs use
STALENESS_EXPONENT: float = AggregatorSettings.model_fields["staleness_exponent"].default

MODES = ("async", "sync")


class AsyncVsSyncConfig(BaseModel):
    """Everything both arms share, in one place, so they cannot drift apart."""

    model_config = ConfigDict(extra="forbid")

    data_npz: Path
    out: Path = Path("reports/async_vs_sync")
    reproduce_results: Path | None = Path("reports/reproduce/results.json")
    workdir: Path = Path("var/async-vs-sync")
    seeds: int = Field(3, ge=1)
    n_sites: int = Field(3, ge=2)
    #: index of the straggler in site order
    slow_site: int = Field(2, ge=0)
    slow_factor: float = Field(4.0, ge=1.0)
    #: async K; None = the rule in experiments/defaults.py (n_sites under DP, half without)
    buffer_size: int | None = Field(None, ge=1)
    server_lr: float = Field(1.0, gt=0)
    #: refuse updates older than this many versions: the aggregator's shipped bound (a version
    #: then still takes the straggler's updates, at weight (1 + tau)^-a; refusals are reported)
    max_staleness: int = Field(AggregatorSettings.model_fields["max_staleness"].default, ge=0)
    dp_enabled: bool = True
    target_epsilon: float = Field(1.2, gt=0)
    planned_rounds: int = Field(30, ge=1)
    training: SiteTraining = SiteTraining(optimizer="sgd", lr=0.02, momentum=0.9, batch_size=128, local_epochs=1,
                                          max_grad_norm=1.0)
    #: "equal": every site runs local_steps = ceil(train images / n_sites / batch) per round (one
    #: epoch of an equal share; FedBuff's fixed local steps), so a round costs every site the same
    #: compute and the straggler is slow_factor x slower than each other site, as the issue
    #: defines it. "epochs": one local epoch per round; under Dirichlet(0.5) the sites' image
    #: counts differ up to 6x, so the largest site, not the straggler, may pace a sync round.
    steps_rule: Literal["equal", "epochs"] = "equal"
    #: test AUC a released version must reach (None: run until the budget or time limit ends)
    target_auc: float | None = Field(0.85, gt=0, lt=1)
    time_limit_s: float = Field(900.0, gt=0)
    retrain_after_s: float = Field(60.0, gt=0)
    amqp_url: str | None = None

    def local_steps(self) -> int | None:
        """Steps per round under the "equal" rule (None: the sites' local epochs)."""
        if self.steps_rule == "epochs":
            return None
        import numpy as np

        with np.load(self.data_npz) as data:
            n_train = int(data["train_labels"].shape[0])
        return max(1, math.ceil(n_train / self.n_sites / self.training.batch_size))

    @property
    def async_k(self) -> int:
        return self.buffer_size or async_buffer_size(self.n_sites, dp=self.dp_enabled)

    def spec(self, mode: Literal["async", "sync"], seed: int) -> FederationSpec:
        ids = site_ids(self.n_sites)
        if self.slow_site >= self.n_sites:
            raise ValueError(f"slow_site {self.slow_site} is not one of {self.n_sites} sites")
        return FederationSpec(
            workdir=self.workdir / f"{mode}-seed{seed}", data_npz=self.data_npz, n_sites=self.n_sites, seed=seed,
            mode=mode, buffer_size=self.async_k, server_lr=self.server_lr, dp_enabled=self.dp_enabled,
            target_epsilon=self.target_epsilon, planned_rounds=self.planned_rounds,
            training=self.training.model_copy(update={"local_steps": self.local_steps()}),
            slowdown={ids[self.slow_site]: self.slow_factor}, target_auc=self.target_auc, target_on="test",
            time_limit_s=self.time_limit_s, retrain_after_s=self.retrain_after_s, amqp_url=self.amqp_url,
            max_staleness=self.max_staleness,
            # the comparison reads raw versions only: no second (EMA) scoring competing for the CPU
            score_ema=False,
            # FedBuff's clients train continuously; in sync a second update per round is refused
            train_continuously=(mode == "async"),
        )


def _released(s: VersionScore) -> float:
    """A version's time: when the aggregator released it (the evaluator's scoring may lag)."""
    return s.released_s if s.released_s == s.released_s else s.wall_s


def summarize(mode: str, seed: int, result: FederationResult, target: float | None,
              spec: FederationSpec | None = None, staleness_exponent: float = STALENESS_EXPONENT) -> dict[str, Any]:
    """One run's figures: the time and versions to target, what the versions folded (staleness
    and its weight s(tau) = (1 + tau)^-a), which updates the aggregator refused and why, and
    where each site's time went (experiments/round_anatomy.py)."""
    scores = [s for s in result.scores if s.members]  # versions (snapshots list no contributors)
    reached = next((s for s in scores if target is not None and s.test_auc >= target), None)
    stale = [tau for s in scores for _, tau in s.members]
    weights = [(1.0 + tau) ** -staleness_exponent for tau in stale]
    by_site: dict[str, list[int]] = {}
    for s in scores:
        for site, tau in s.members:
            by_site.setdefault(site, []).append(tau)
    status_sites = (result.aggregator_status or {}).get("sites", {})
    data = (result.data_summary or {}).get("sites", {})
    first = min((s.released_s for s in scores if s.released_s == s.released_s), default=None)
    anat = anatomy(spec.workdir, sorted(result.updates_by_site)) if spec is not None else None
    # start-up (broker, processes, loading each site's images, the join wait) is the same work in
    # both modes and not what asynchrony acts on: the second clock starts at the first round
    startup = (anat["first_round_at"] - result.started_at) if anat and anat.get("first_round_at") and result.started_at else None
    return {
        "mode": mode, "seed": seed,
        "seconds_to_target": _released(reached) if reached else None,
        "startup_seconds": startup,
        "seconds_to_target_from_first_round": (_released(reached) - startup) if reached and startup is not None else None,
        "versions_to_target": reached.version if reached else None,
        "versions": len(scores), "wall_seconds": result.wall_seconds, "stop_reason": result.stop_reason,
        "first_version_s": first,
        "updates_per_version": (sum(len(s.members) for s in scores) / len(scores)) if scores else None,
        "mean_staleness": (sum(stale) / len(stale)) if stale else None,
        "max_staleness": max(stale) if stale else None,
        "mean_staleness_weight": (sum(weights) / len(weights)) if weights else None,
        "folded_by_site": {site: {"updates": len(t), "mean_staleness": sum(t) / len(t)} for site, t in sorted(by_site.items())},
        "refused_by_site": {site: info.get("rejected", {}) for site, info in status_sites.items() if info.get("rejected")},
        "train_images_by_site": {site: sum(v.get("train", {}).values()) for site, v in data.items()},
        "updates_by_site": result.updates_by_site, "epsilon_by_site": result.epsilon_by_site,
        "anatomy": anat,
        "curve": [{"version": s.version, "wall_s": _released(s), "scored_s": s.wall_s, "test_auc": s.test_auc,
                   "val_auc": s.val_auc, "members": [list(m) for m in s.members]} for s in scores],
    }


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals and len(vals) == len(xs) else None


def aggregate(cfg: AsyncVsSyncConfig, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``async_vs_sync`` entry: per-seed and mean seconds to target for each mode."""
    per = {m: [r for r in runs if r["mode"] == m] for m in MODES}
    secs = {m: [r["seconds_to_target"] for r in per[m]] for m in MODES}
    a, s = _mean(secs["async"]), _mean(secs["sync"])
    from_first = {m: [r.get("seconds_to_target_from_first_round") for r in per[m]] for m in MODES}
    a1, s1 = _mean(from_first["async"]), _mean(from_first["sync"])
    versions = [r["versions_to_target"] for r in per["sync"]] + [r["versions_to_target"] for r in per["async"]]
    reached = [v for v in versions if v is not None]
    return {
        "source": "processes",
        "target_auc": cfg.target_auc, "target_on": "test",
        "seeds": sorted({r["seed"] for r in runs}),
        "async_seconds_to_target": a, "sync_seconds_to_target": s,
        "async_seconds_to_target_per_seed": secs["async"], "sync_seconds_to_target_per_seed": secs["sync"],
        "speedup_sync_over_async": (s / a) if a and s else None,
        # the same, on a clock that starts at the first local round (start-up excluded, same in both)
        "async_seconds_to_target_from_first_round": a1, "sync_seconds_to_target_from_first_round": s1,
        "async_seconds_to_target_from_first_round_per_seed": from_first["async"],
        "sync_seconds_to_target_from_first_round_per_seed": from_first["sync"],
        "speedup_from_first_round": (s1 / a1) if a1 and s1 else None,
        "speedup_per_seed": [(y / x) if x and y else None for x, y in zip(secs["async"], secs["sync"])],
        # where only async reached the target, sync took longer than the whole run: a lower bound
        "speedup_per_seed_at_least": [(cfg.time_limit_s / x) if x and not y else None
                                      for x, y in zip(secs["async"], secs["sync"])],
        "min_versions_to_target": min(reached) if reached else None,
        "target_needs_10_versions": bool(reached) and min(reached) >= 10,
        "n_sites": cfg.n_sites, "slow_site": site_ids(cfg.n_sites)[cfg.slow_site], "slow_factor": cfg.slow_factor,
        "steps_rule": cfg.steps_rule, "local_steps": cfg.local_steps(),
        "async_buffer_size": cfg.async_k, "server_lr": cfg.server_lr, "dp_enabled": cfg.dp_enabled,
        "target_epsilon": cfg.target_epsilon if cfg.dp_enabled else None, "planned_rounds": cfg.planned_rounds,
        "time_limit_s": cfg.time_limit_s,
        "staleness_exponent": STALENESS_EXPONENT, "max_staleness": cfg.max_staleness,
        "diagnostics": {m: {"mean_staleness": _mean([r["mean_staleness"] for r in per[m]]),
                            "mean_staleness_weight": _mean([r.get("mean_staleness_weight") for r in per[m]]),
                            "updates_per_version": _mean([r["updates_per_version"] for r in per[m]]),
                            "seconds_between_versions": _mean([(r.get("anatomy") or {}).get("seconds_between_versions")
                                                               for r in per[m]]),
                            "startup_seconds": _mean([r.get("startup_seconds") for r in per[m]]),
                            "refused": [r.get("refused_by_site", {}) for r in per[m]],
                            "versions_to_target": [r["versions_to_target"] for r in per[m]]} for m in MODES},
        "runs": runs,
    }


def straggler_dominance(run: dict[str, Any], slow_site: str) -> float | None:
    """The straggler's wall seconds per round over the slowest other site's: above 1 it is the
    one a sync round waits for (what async can save); near or below 1 another site (the one
    with the most images) paces sync too, and async has little to gain."""
    sites = ((run.get("anatomy") or {}).get("sites") or {})
    slow = (sites.get(slow_site) or {}).get("wall_s_per_round")
    others = [a.get("wall_s_per_round") for s, a in sites.items() if s != slow_site and a.get("wall_s_per_round")]
    return (slow / max(others)) if slow and others else None


def markdown_table(entry: dict[str, Any]) -> str:
    """Per seed: seconds (and versions) to target per mode on both clocks, the ratio, and why."""
    def f(x: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if x is None else fmt.format(x)

    slow = entry["slow_site"]
    rows = ["| seed | sync: s to target (versions) | async: s to target (versions) | sync / async | "
            "same, from the first round | straggler's images | straggler round / slowest other (sync) |",
            "|---|---|---|---|---|---|---|"]
    for seed in entry["seeds"]:
        runs = {r["mode"]: r for r in entry["runs"] if r["seed"] == seed}
        sy, asy = runs.get("sync", {}), runs.get("async", {})
        s, a = sy.get("seconds_to_target"), asy.get("seconds_to_target")
        s1, a1 = sy.get("seconds_to_target_from_first_round"), asy.get("seconds_to_target_from_first_round")
        imgs = sy.get("train_images_by_site") or {}
        share = f"{imgs.get(slow, 0)} of {sum(imgs.values())}" if imgs else "-"
        ratio = f(s / a, "{:.2f}x") if s and a else (f"> {entry['time_limit_s'] / a:.2f}x" if a and entry.get("time_limit_s") else "-")
        rows.append(f"| {seed} | {f(s) if s else '> ' + f(entry.get('time_limit_s'))} ({f(sy.get('versions_to_target'), '{}')}) | "
                    f"{f(a)} ({f(asy.get('versions_to_target'), '{}')}) | {ratio} | "
                    f"{f(s1)} vs {f(a1)}: {f(s1 / a1 if s1 and a1 else None, '{:.2f}x')} | {share} | "
                    f"{f(straggler_dominance(sy, slow), '{:.2f}')} |")
    a, s = entry["async_seconds_to_target"], entry["sync_seconds_to_target"]
    rows.append(f"| mean | {f(s)} | {f(a)} | {f(entry['speedup_sync_over_async'], '{:.2f}x')} | "
                f"{f(entry.get('sync_seconds_to_target_from_first_round'))} vs "
                f"{f(entry.get('async_seconds_to_target_from_first_round'))}: "
                f"{f(entry.get('speedup_from_first_round'), '{:.2f}x')} | | |")
    return "\n".join(rows) + "\n"


def plot(entry: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = {"async": "tab:blue", "sync": "tab:orange"}
    styles = ("-", "--", ":", "-.")
    for run in entry["runs"]:
        pts = run["curve"]
        k = entry["async_buffer_size"] if run["mode"] == "async" else entry["n_sites"]
        style = styles[entry["seeds"].index(run["seed"]) % len(styles)] if run["seed"] in entry["seeds"] else "-"
        ax.plot([p["wall_s"] for p in pts], [p["test_auc"] for p in pts], marker=".", color=colors[run["mode"]],
                linestyle=style, alpha=0.8, label=f"{run['mode']} (K={k}), seed {run['seed']}")
    if entry["target_auc"] is not None:
        ax.axhline(entry["target_auc"], color="grey", linestyle="--", linewidth=1, label=f"target {entry['target_auc']}")
    ax.set_xlabel("wall-clock seconds since the processes started")
    ax.set_ylabel("test AUC of the released version")
    ax.set_title(f"async vs sync on real processes, {entry['slow_site']} {entry['slow_factor']:g}x slower, "
                 f"seeds {entry['seeds']}, local work: {entry.get('steps_rule', 'epochs')}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def merge_into_results(path: Path, entry: dict[str, Any]) -> None:
    """Set ``async_vs_sync`` in the reproduction's results.json, keeping everything else."""
    from fedmq.shared.atomic import atomic_write_json

    data = json.loads(path.read_text()) if path.exists() else {}
    data["async_vs_sync"] = {k: v for k, v in entry.items() if k != "runs"}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def run(cfg: AsyncVsSyncConfig, progress: Callable[[str], None] = print,
        run_one: Callable[[FederationSpec], FederationResult] | None = None) -> dict[str, Any]:
    """Both modes for every seed, sync first within a seed; writes the outputs."""
    runs = []
    for seed in range(cfg.seeds):
        for mode in ("sync", "async"):
            spec = cfg.spec(mode, seed)  # type: ignore[arg-type]
            t = time.monotonic()
            progress(f"seed {seed} {mode}: starting")
            result = (run_one or (lambda sp: run_federation(sp, progress)))(spec)
            summary = summarize(mode, seed, result, cfg.target_auc, spec)
            progress(f"seed {seed} {mode}: {summary['versions']} versions, target "
                     + (f"at {summary['seconds_to_target']:.0f} s (version {summary['versions_to_target']})"
                        if summary["seconds_to_target"] is not None else "not reached")
                     + f" ({time.monotonic() - t:.0f} s)")
            runs.append(summary)
    entry = aggregate(cfg, runs)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "async_vs_sync.json").write_text(json.dumps(entry, indent=2, default=_json_default) + "\n")
    plot(entry, cfg.out / "async_vs_sync.png")
    (cfg.out / "async_vs_sync.md").write_text(markdown_table(entry))
    if cfg.reproduce_results is not None:
        merge_into_results(cfg.reproduce_results, entry)
    a, s = entry["async_seconds_to_target"], entry["sync_seconds_to_target"]
    progress(f"async {_fmt(a)} s, sync {_fmt(s)} s to test AUC {cfg.target_auc}"
             + (f": sync/async = {entry['speedup_sync_over_async']:.2f}x" if entry["speedup_sync_over_async"] else ""))
    return entry


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o)}")
