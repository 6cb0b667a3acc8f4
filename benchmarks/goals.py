"""The goals ``make bench`` is judged against: one table, read by ``benchmarks.judge`` (the
verdicts in latest.json) and ``benchmarks.report`` (the goals table of latest.md and the lines
printed at the end). A goal is changed here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Goal:
    #: the verdict's key in latest.json
    key: str
    #: the row's label in latest.md ({preset} and {cpus} are filled in from the run)
    figure: str
    #: the goal as people read it (latest.json "goals", latest.md)
    text: str
    #: the comparison that meets it; None = reported, not judged
    op: Literal[">=", "<="] | None = None
    bound: float | None = None
    #: where the value is in the result: a top-level key, or a path into nested sections
    path: tuple[str, ...] = ()
    #: the wire goal's second half: at most this many AUC points of cost (judged on the AUC table)
    max_auc_cost_points: float | None = None
    #: unit printed after the value in latest.md
    unit: str = ""
    #: a figure in bytes shown beside the value in latest.md (the absolute size behind a ratio)
    bytes_key: str | None = None

    def value(self, result: dict[str, Any]) -> Any:
        node: Any = result
        for k in self.path or (self.key,):
            node = node.get(k) if isinstance(node, dict) else None
        return node

    def met_by(self, x: Any) -> bool | None:
        """True or False against the bound; None when there is no number or no bound."""
        if self.op is None or self.bound is None or not isinstance(x, (int, float)) or isinstance(x, bool):
            return None
        return bool(x >= self.bound) if self.op == ">=" else bool(x <= self.bound)


GOALS: tuple[Goal, ...] = (
    Goal("aggregator_vs_floor", "aggregator end to end / floor", ">= 0.5", ">=", 0.5),
    Goal("wire_bytes_ratio_vs_dense_fp32", "wire bytes per update / dense float32 (defaults: top-k 0.5, {preset})",
         "<= 1.0 at <= 1 AUC point of cost", "<=", 1.0, max_auc_cost_points=1.0),
    Goal("site_overhead_fraction", "site overhead (sparsify+encrypt+sign+publish) / local training", "<= 0.10", "<=", 0.10),
    Goal("shard_speedup_2", "two shards / one shard (aggregator processes, {cpus} cores)", ">= 1.7 (2 cores)", ">=", 1.7),
    Goal("async_vs_sync_speedup", "time to target AUC, sync / async (one 4x straggler)", "(reported)"),
    Goal("audit_verify_100x3_s", "audit verify, 100 versions x 3 sites", "<= 1 s", "<=", 1.0, unit=" s"),
    Goal("hybrid_sign_verify_share_of_site_round", "hybrid sign (update) + verify (version) / site training round",
         "<= 0.05", "<=", 0.05, path=("signatures", "site_sign_plus_verify_share_of_training")),
    Goal("ckks_bytes_per_value", "CKKS bytes per value ({preset})", "<= 7.1 (goal 6.2)", "<=", 7.1),
    Goal("resnet50_site_build_seconds", "dense ResNet-50-size update built at the site (sparsify + encrypt + sign), s",
         "<= 5 (2 cores)", "<=", 5.0),
    Goal("resnet50_fold_seconds", "the same update folded by the aggregator from the broker, s", "<= 5 (2 cores)",
         "<=", 5.0),
    Goal("aggregator_peak_rss_vs_encrypted_model", "aggregator peak RSS / encrypted model size", "<= 3", "<=", 3.0,
         bytes_key="aggregator_peak_rss_bytes"),
)

BY_KEY: dict[str, Goal] = {g.key: g for g in GOALS}

#: issue 12's goals for DP training of resnet50_224 on a CUDA GPU, judged by ``benchmarks.gpu``
#: (a separate command, run where a GPU is lent): DP / plain images per second, peak GPU memory
#: at the default physical batch (GiB), DP round / plain round
GPU_GOALS: dict[str, float] = {
    "dp_over_plain_images_per_s": 0.7,
    "dp_peak_gib_at_default_physical_batch": 16.0,
    "dp_round_over_plain_round": 1.3,
}


def goal_texts() -> dict[str, str]:
    """key -> goal text of every judged goal (latest.json's ``goals``)."""
    return {g.key: g.text for g in GOALS if g.op is not None}
