"""``fedmq status --state-dir DIR``: the federation at a glance, from the aggregator's status.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", required=True, help="the aggregator's state directory")
    parser.add_argument("--json", action="store_true", help="print the raw status.json")
    parser.set_defaults(handler=_status)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ago(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    s = max(0.0, now - ts)
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago")


def render(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [
        f"version {status['version']}  mode {status['mode']}  buffer {status['buffer_fill']}/{status['buffer_size']}"
        f"  incomplete {status.get('pending_updates', 0)}  folded {status.get('updates_folded_total', 0)}"
        f"  (updated {_ago(status.get('updated_at'), now)})",
    ]
    if status.get("rejected"):
        lines.append("rejected: " + ", ".join(f"{k}={v}" for k, v in sorted(status["rejected"].items())))
    header = ("site", "last update", "when", "staleness", "behind", "folded", "epsilon", "AUC", "rejected")
    rows = [header]
    for site, info in sorted(status.get("sites", {}).items()):
        eps = info.get("epsilon_spent")
        tgt = info.get("epsilon_target")
        rows.append((
            site, _fmt(info.get("last_update_id")), _ago(info.get("last_update_at"), now),
            _fmt(info.get("last_staleness")), _fmt(info.get("versions_behind")), _fmt(info.get("updates_folded", 0)),
            "-" if eps is None else (f"{eps:.2f}/{tgt:.2f}" if isinstance(tgt, (int, float)) else f"{eps:.2f}"),
            _fmt(info.get("auc")), _fmt(sum((info.get("rejected") or {}).values()) or 0),
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.extend(alerts(status, now))
    return "\n".join(lines)


def alerts(status: dict[str, Any], now: float) -> list[str]:
    """One line per site that needs a person: its state went backwards, or it paused itself."""
    out = []
    for site, info in sorted(status.get("sites", {}).items()):
        back = info.get("sequence_backwards")
        if back:
            out.append(
                f"ALERT {site}: SEQUENCE WENT BACKWARDS (sent seq {back.get('seq')} after {back.get('last_seq')}, "
                f"{back.get('count', 1)} time(s), last {_ago(back.get('at'), now)}): its state directory and privacy "
                f"ledger were lost; restore them, never start it afresh"
            )
        if info.get("alert"):
            out.append(f"ALERT {site}: {info['alert']} (reported {_ago(info.get('metrics_at'), now)})")
    return out


def _status(args: argparse.Namespace) -> int:
    from fedmq.aggregator.engine import STATUS_FILE
    from fedmq.shared.errors import ConfigError

    path = Path(args.state_dir) / STATUS_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found; is the aggregator's --state-dir right?")
    status = json.loads(path.read_text())
    print(json.dumps(status, indent=2, sort_keys=True) if args.json else render(status))
    return 0
