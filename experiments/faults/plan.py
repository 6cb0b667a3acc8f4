"""What a fault run does (:class:`FaultPlan`) and what it observed (:class:`LiveResult`).

Plain records: ``experiments.faults.live`` fills a ``LiveResult`` from the outside of a live
federation, ``experiments.faults.judge`` decides whether it passed against the plan's bounds,
``experiments.faults.report`` writes it down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class FaultCheckFailed(RuntimeError):
    """A property the fault driver checks while it runs did not hold (the fuzzers' properties,
    a process that did not come back): the run stops here instead of writing a result."""


@dataclass
class FaultPlan:
    aggregator_kills: int = 20
    broker_restarts: int = 1
    connection_closes: int = 1
    #: the victim site is SIGKILLed after the first chunk of its n-th multi-chunk update
    site_mid_publish_kills: int = 1
    mid_publish_update: int = 2
    planned_rounds: int = 30
    buffer_size: int = 2
    target_epsilon: float = 1.2
    #: the settings' minimum: small enough that small_cnn's top-k update (three 25 kB ciphertexts)
    #: takes two chunks, so a site can be killed between them
    max_message_bytes: int = 64 * 1024
    #: random pause before each event, counted from the moment the aggregator consumes again
    pause_s: tuple[float, float] = (0.3, 2.5)
    seed: int = 0
    #: bound on any process's recovery (restart -> consuming / connected): the judge fails a run
    #: whose slowest recovery took longer; the driver gives up waiting at twice this
    max_recovery_s: float = 45.0
    time_limit_s: float = 900.0
    train_samples: int | None = None  # informational (the slice is prepared by the caller)


@dataclass
class LiveResult:
    seed: int
    wall_seconds: float
    kills: int
    broker_restarts: int
    connection_closes: int
    connections_closed: int
    site_mid_publish_kills: int
    updates_built: int
    updates_confirmed: int
    updates_counted: int
    lost: list[str]
    duplicates: list[str]
    counted_unconfirmed: list[str]
    partial_pending: list[str]
    final_version: int
    model_max_abs_error: float
    min_update_contribution: float
    sites_agree_with_aggregator: bool
    epsilon_by_site: dict[str, float]
    epsilon_target: float
    recovery_seconds: dict[str, list[float]]
    first_accept_after_restart_s: list[float]
    max_recovery_seconds: float
    dead_letters: dict[str, int]
    observed_versions: int
    contributor_weight_mismatches: int
    unexpected_exits: list[str]
    #: the plan's bound on recovery this run was judged against (``FaultPlan.max_recovery_s``)
    max_recovery_bound_s: float = FaultPlan.max_recovery_s
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problems() == []

    def problems(self) -> list[str]:
        """Every way this run failed its guarantees (``fedmq.experiments.faults.judge``)."""
        from fedmq.experiments.faults.judge import live_problems

        return live_problems(self)
