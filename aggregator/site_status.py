"""What the aggregator knows about each site: one typed record per site, with its writers.

It used to be an untyped ``dict[str, dict[str, Any]]`` written in four places of the engine;
a ``SiteStatus`` names every field, and each event that changes it is one method. The record
is persisted in the checkpoint (``sites``) and shown in ``status.json`` (``fedmq status``) in
the same plain-dict form as before (``to_dict`` / ``from_dict``): fields never set are left out.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class SequenceAlarm:
    """The site's sequence went backwards (its state directory was lost): ``fedmq.aggregator.seqguard``."""

    seq: int
    last_seq: int
    at: float
    count: int = 1


@dataclass
class SiteStatus:
    # from its updates' first chunks
    sample_weight: float | None = None
    last_header: str | None = None  # digest of the last accepted update's header (seqguard)
    sequence_backwards: SequenceAlarm | None = None
    # from its folded updates
    last_update_id: str | None = None
    last_update_at: float | None = None
    last_staleness: int | None = None
    last_weight_units: int | None = None
    last_base_version: int | None = None
    updates_folded: int = 0
    # refusals, by reason (the dead-letter reason header and metric label)
    rejected: dict[str, int] = field(default_factory=dict)
    # from its metrics messages
    epsilon_spent: float | None = None
    epsilon_target: float | None = None
    auc: float | None = None
    metrics_version: int | None = None
    n_val: int | None = None
    updates_sent: int | None = None
    metrics_at: float | None = None
    alert: str | None = None

    # ------------------------------------------------------------------ events

    def note_refused(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def note_first_chunk(self, sample_weight: float, header_digest: str | None, seq: int) -> None:
        """An update's first chunk was logged; ``header_digest`` is given when its seq is the
        site's newest (the one a re-send is compared against)."""
        self.sample_weight = float(sample_weight)
        if header_digest is not None:
            self.last_header = header_digest
            # a site restored from backup continues past the last accepted seq: the alarm is over
            if self.sequence_backwards is not None and seq > self.sequence_backwards.last_seq:
                self.sequence_backwards = None

    def note_sequence_backwards(self, seq: int, last_seq: int) -> None:
        prev = self.sequence_backwards.count if self.sequence_backwards is not None else 0
        self.sequence_backwards = SequenceAlarm(int(seq), int(last_seq), time.time(), prev + 1)

    def note_folded(self, update_id: str, staleness: int, weight_units: int, base_version: int) -> None:
        self.last_update_id, self.last_update_at = update_id, time.time()
        self.last_staleness, self.last_weight_units, self.last_base_version = staleness, weight_units, base_version
        self.updates_folded += 1

    def note_metrics(self, *, epsilon_spent: float | None, epsilon_target: float | None, auc: float | None,
                     version: int | None, n_val: int | None, updates_sent: int | None, at: float | None,
                     alert: str | None) -> None:
        self.epsilon_spent, self.epsilon_target, self.auc = epsilon_spent, epsilon_target, auc
        self.metrics_version, self.n_val, self.updates_sent = version, n_val, updates_sent
        self.metrics_at, self.alert = at, alert

    # ------------------------------------------------------------------ plain form

    def to_dict(self) -> dict[str, Any]:
        """The persisted / status.json form: fields never set are left out."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or (f.name == "rejected" and not value) or (f.name == "updates_folded" and not value):
                continue
            out[f.name] = asdict(value) if isinstance(value, SequenceAlarm) else (
                dict(value) if isinstance(value, dict) else value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SiteStatus":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        alarm = kw.get("sequence_backwards")
        kw["sequence_backwards"] = SequenceAlarm(**alarm) if alarm else None
        kw["rejected"] = {str(r): int(n) for r, n in (kw.get("rejected") or {}).items()}
        kw["updates_folded"] = int(kw.get("updates_folded") or 0)
        return cls(**kw)
