"""Buffering and staleness policy: which updates to accept, with what weight, and when to commit.

One object for both modes, so the synchronous FedAvg baseline runs the same code path:

- ``async`` (FedBuff): any base version within ``max_staleness`` of the current one is
  accepted with weight s(tau) = (1+tau)^-a; a version commits after ``buffer_size`` folds.
- ``sync`` (FedAvg rounds): only base_version == current; each pinned site once per round;
  the version commits when every pinned site has contributed.

Membership lives here too: who is a member (the pinned sites), who is in the current sync
round (``round_sites``: a site joins it with its update's first logged chunk, leaves it when that
update is dropped or expires, and a new round starts at each commit with the sites whose updates
are still incomplete), and how a snapshot request is answered (``answer_snapshot_request``). The
engine only reports events; the rules are these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fedmq.aggregator.fold import weight_units
from fedmq.shared.errors import ConfigError, FutureBaseVersion, TooStale, WireError


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
    #: sync mode: the sites with an update in the round towards the next version (rebuilt from
    #: the WAL on restart); always empty in async mode
    round_sites: set[str] = field(default_factory=set)

    def check_members(self) -> None:
        """Sync mode needs its members up front: K is their number."""
        if self.mode == "sync" and not self.sites:
            raise ConfigError("sync mode needs pinned site keys (K = number of sites)")

    def note_admitted(self, site_id: str) -> None:
        """An update of ``site_id`` entered the log: in sync mode the site is in this round."""
        if self.mode == "sync":
            self.round_sites.add(site_id)

    def note_abandoned(self, site_id: str) -> None:
        """An update of ``site_id`` was dropped or expired before it was folded: in sync mode the
        site may contribute to this round again."""
        if self.mode == "sync":
            self.round_sites.discard(site_id)

    def start_round(self, incomplete_sites: set[str]) -> None:
        """A version was committed: the next sync round holds the sites whose updates (admitted
        against the old version) are still incomplete."""
        self.round_sites = set(incomplete_sites) if self.mode == "sync" else set()

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
        round_sites: set[str] | frozenset[str] | None = None,
    ) -> Admission:
        """Decide on an update's first chunk; raises a WireError (with .reason) to refuse it.
        ``round_sites`` None: the policy's own round (``self.round_sites``)."""
        if round_sites is None:
            round_sites = self.round_sites
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

    def commit_due(self, folded: int, round_sites: set[str] | frozenset[str] | None = None) -> bool:
        """``round_sites`` None: the policy's own round."""
        if round_sites is None:
            round_sites = self.round_sites
        if self.mode == "sync":
            return bool(self.sites) and set(self.sites) <= set(round_sites) and folded >= len(self.sites)
        return folded >= self.buffer_size


SnapshotAnswer = Literal["send", "known-identity", "other-shard"]


def answer_snapshot_request(*, have_version: int, accepted_seq: int, shard_index: int, own_shard: int) -> SnapshotAnswer:
    """How the aggregator answers a site's snapshot request.

    - ``known-identity``: the site starts with no state (``have_version == -1``) under an id whose
      updates were already accepted: its privacy ledger is gone; it is told so, not fed a model.
    - ``other-shard``: only shard 0 consumes the (single) snapshot-request queue; another shard's
      blocks reach the site through that shard's start-up and periodic snapshots (docs/sharding.md).
    - ``send``: the current version's blocks, to that site alone.
    """
    if have_version == -1 and accepted_seq > 0:
        return "known-identity"
    if shard_index != own_shard:
        return "other-shard"
    return "send"
