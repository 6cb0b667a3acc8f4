"""The *judge* half of ``make bench``: each goal of ``benchmarks.goals`` against this run's
figure. A missing figure gets no verdict (``met: None``), never a pass."""

from __future__ import annotations

from typing import Any

from benchmarks.goals import GOALS, Goal


def _wire(goal: Goal, r: dict[str, Any]) -> dict[str, Any]:
    """Both halves: the default setting's bytes ratio, and its AUC cost from the AUC table."""
    rows = r.get("auc_table") or []
    default = r.get("wire_default", {})

    def meets(row: dict[str, Any]) -> bool:
        return bool(goal.met_by(row["ratio_vs_dense_fp32"])) and row["auc_cost_points"] <= goal.max_auc_cost_points

    met = None
    for row in rows:
        if row["preset"] == default.get("ckks_preset") and abs(row["topk_fraction"] - default.get("topk_fraction", -1)) < 1e-9:
            met = meets(row)
    return {"value": goal.value(r), "met": met,
            "settings_meeting_goal": [(row["preset"], row["topk_fraction"]) for row in rows if meets(row)]}


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    """key -> {"value", "met"} for every judged goal."""
    out: dict[str, Any] = {}
    for goal in GOALS:
        if goal.op is None:
            continue
        if goal.max_auc_cost_points is not None:
            out[goal.key] = _wire(goal, r)
        else:
            x = goal.value(r)
            out[goal.key] = {"value": x, "met": goal.met_by(x)}
    return out
