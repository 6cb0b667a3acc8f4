"""Buffering and staleness policy: which updates to accept, with what weight, and when to commit.

One object for both modes, so the synchronous FedAvg baseline runs the same code path:

- ``async`` (FedBuff): any base version within ``max_staleness`` of the current one is
  accepted with weight s(tau) = (1+tau)^-a; a version commits after ``buffer_size`` folds.
- ``sync`` (FedAvg rounds): only base_version == current; each pinned site once per round;
  the version commits when every pinned site has contributed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aggregator.fold import weight_units
from shared.errors import FutureBaseVersion, TooStale, WireError


class DuplicateRound(WireError):
    """Sync mode: the site already contributed to the current round."""

    reason = "duplicate-round"


@dataclass(frozen=True)
class Admission:
    staleness: int
    weight_units: int


@dataclass
class Policy:
    mode: Literal["async", "sync"]
    buffer_size: int
    staleness_exponent: float
    max_staleness: int
    weight_quantum: int
    #: None (the default): w_ref is the mean of the sample weights the sites actually report
    #: (each site's latest), so a version's step is a weighted mean of its updates whatever the
    #: hospitals' image counts. A fixed number is for experiments that pin w_ref themselves.
    reference_sample_weight: float | None = None
    sites: frozenset[str] = frozenset()
    #: site -> the sample weight it last reported (rebuilt from the checkpoint and WAL on restart)
    reported: dict[str, float] = field(default_factory=dict)

    def note_reported(self, site_id: str, sample_weight: float) -> None:
        self.reported[site_id] = float(sample_weight)

    def reference_weight(self, site_id: str, sample_weight: float) -> float:
        """w_ref for an update of ``site_id`` reporting ``sample_weight``: the configured value,
        else the mean of the latest weights reported by every site seen so far, this one included.
        Each update's factor w / w_ref is then at most the number of sites, never the image count."""
        if self.reference_sample_weight is not None:
            return float(self.reference_sample_weight)
        seen = dict(self.reported)
        seen[site_id] = float(sample_weight)
        return sum(seen.values()) / len(seen)

    @property
    def commit_after(self) -> int:
        """K: folded updates per version."""
        return len(self.sites) if self.mode == "sync" else self.buffer_size

    def admit(
        self,
        *,
        site_id: str,
        base_version: int,
        current_version: int,
        sample_weight: float,
        round_sites: set[str] | frozenset[str] = frozenset(),
    ) -> Admission:
        """Decide on an update's first chunk; raises a WireError (with .reason) to refuse it."""
        if base_version > current_version:
            raise FutureBaseVersion(f"base_version {base_version} > current version {current_version}")
        tau = current_version - base_version
        if self.mode == "sync":
            if tau != 0:
                raise TooStale(f"sync mode accepts only base_version {current_version}, got {base_version}")
            if site_id in round_sites:
                raise DuplicateRound(f"{site_id} already contributed to the round for version {current_version + 1}")
            units = weight_units(
                0, sample_weight, quantum=self.weight_quantum, exponent=0.0,
                reference_sample_weight=self.reference_weight(site_id, sample_weight),
            )
            return Admission(0, units)
        if tau > self.max_staleness:
            raise TooStale(f"staleness {tau} exceeds max_staleness {self.max_staleness}")
        units = weight_units(
            tau, sample_weight, quantum=self.weight_quantum, exponent=self.staleness_exponent,
            reference_sample_weight=self.reference_weight(site_id, sample_weight),
        )
        return Admission(tau, units)

    def commit_due(self, folded: int, round_sites: set[str] | frozenset[str]) -> bool:
        if self.mode == "sync":
            return bool(self.sites) and set(self.sites) <= set(round_sites) and folded >= len(self.sites)
        return folded >= self.buffer_size
