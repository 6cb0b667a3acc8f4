"""Where a real federation's wall-clock time went, read back from its processes' JSON logs.

Why: "async is not faster" has several possible causes that the evaluator's curve alone cannot
tell apart: the straggler's training may be a small part of a round (then it barely slows sync),
fast sites may sit idle waiting for a version (then async cannot use their speed), or updates
may be refused as too stale (budget spent for nothing). Each site agent logs one ``update ready``
line per round (its compute seconds and the round's wall seconds, which include the straggler
emulation's proportional wait) and one ``update published`` line; the aggregator logs each
commit. Nothing here changes a run: it only reads ``<workdir>/logs``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any


def _events(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "ts" in rec and "msg" in rec:
            rec["t"] = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
            out.append(rec)
    return out


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 3) if xs else None


def site_anatomy(log: Path) -> dict[str, Any]:
    """One site: rounds, compute and wall seconds per round, and the idle seconds between
    publishing an update and starting the next round (waiting for a new version)."""
    ev = _events(log)
    ready = [e for e in ev if e["msg"] == "update ready"]
    published = [e["t"] for e in ev if e["msg"] == "update published"]
    starts = [e["t"] - float(e.get("round_wall_s", 0.0)) for e in ready]
    compute = [float(e.get("total_s", 0.0)) + float(e.get("encrypt_s", 0.0)) for e in ready]
    wall = [float(e.get("round_wall_s", 0.0)) for e in ready]
    # idle: from an update's publication to the start of the next round
    idle = [s - p for p, s in zip(published, starts[1:]) if s >= p]
    busy = sum(wall)
    span = (published[-1] - starts[0]) if published and starts else 0.0
    return {
        "rounds": len(ready),
        "compute_s_per_round": _mean(compute[1:] or compute),  # the first round also loads data and calibrates
        "wall_s_per_round": _mean(wall[1:] or wall),
        "idle_s_between_rounds": _mean(idle),
        "busy_fraction": round(busy / span, 3) if span > 0 else None,
        "base_versions": [int(e.get("base_version", -1)) for e in ready],
        "first_round_start_s": starts[0] if starts else None,
    }


def anatomy(workdir: Path, sites: list[str]) -> dict[str, Any]:
    """Per site (see :func:`site_anatomy`) and for the aggregator: seconds between commits."""
    logs = Path(workdir) / "logs"
    per_site = {s: site_anatomy(logs / f"{s}.log") for s in sites}
    commits = [e["t"] for e in _events(logs / "aggregator.log") if " committed: " in e["msg"]]
    gaps = [b - a for a, b in zip(commits, commits[1:])]
    t0 = min((a["first_round_start_s"] for a in per_site.values() if a["first_round_start_s"]), default=None)
    for a in per_site.values():  # absolute times are of no use in a report: relative to the first round
        a["first_round_start_s"] = round(a["first_round_start_s"] - t0, 2) if a["first_round_start_s"] and t0 else None
    return {"sites": per_site, "seconds_between_versions": _mean(gaps),
            "first_version_after_first_round_s": round(commits[0] - t0, 2) if commits and t0 else None,
            #: epoch seconds at which the first round of any site started
            "first_round_at": t0}


__all__ = ["anatomy", "site_anatomy"]
