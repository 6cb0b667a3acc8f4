"""A site's durable record of the privacy it has spent, written before any update leaves the site.

The ledger is the only defence against a restarted site silently re-spending its budget, so
it is written atomically (temp file, fsync, rename), versioned, and bound to the DP
parameters it was computed for: reusing it under another noise multiplier, sample rate or
delta would make the reported epsilon meaningless, so that is refused.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from fedmq.site_agent.training.errors import LedgerConfigMismatch, LedgerError, PrivacyBudgetExhausted

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_REL_TOL = 1e-9
# get_noise_multiplier aims just below the target; allow for float round-off when the
# per-round RDP terms are summed instead of computed in one go.
_EPS_SLACK = 1e-9


class LedgerParams(BaseModel):
    """The DP parameters every recorded round must share."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    noise_multiplier: PositiveFloat
    sample_rate: float = Field(gt=0.0, le=1.0)
    delta: float = Field(gt=0.0, lt=1.0)
    target_epsilon: PositiveFloat
    steps_per_round: PositiveInt
    planned_rounds: PositiveInt


class _LedgerFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int
    params: LedgerParams
    history: list[tuple[float, float, int]]
    rounds_done: int = Field(ge=0)


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One-step RDP curve over Opacus' default orders (pure function, safe to memoise)."""
    curve = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS
    )
    return np.asarray(curve, dtype=np.float64)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=0.0)


class PrivacyLedger:
    """RDP accountant history plus rounds done, persisted at ``path`` (``None``: in memory only)."""

    def __init__(
        self,
        params: LedgerParams,
        path: Path | str | None = None,
        history: list[tuple[float, float, int]] | None = None,
        rounds_done: int = 0,
    ) -> None:
        self.params = params
        self.path = Path(path) if path is not None else None
        self.history: list[tuple[float, float, int]] = list(history or [])
        self.rounds_done = rounds_done

    # ---------------------------------------------------------------- persistence
    @classmethod
    def load(cls, path: Path | str) -> PrivacyLedger:
        """Read a ledger, refusing anything that is not exactly a ledger of the current schema."""
        source = Path(path)
        try:
            raw = json.loads(source.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LedgerError(f"{source}: privacy ledger is unreadable or corrupt: {exc}") from exc
        if not isinstance(raw, dict):
            raise LedgerError(f"{source}: privacy ledger is not a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise LedgerError(f"{source}: ledger schema version {version!r} is not the supported {SCHEMA_VERSION}")
        try:
            parsed = _LedgerFile.model_validate(raw)
        except ValidationError as exc:
            raise LedgerError(f"{source}: privacy ledger is malformed: {exc}") from exc
        for sigma, q, steps in parsed.history:
            if not (_close(sigma, parsed.params.noise_multiplier) and _close(q, parsed.params.sample_rate)) or steps < 1:
                raise LedgerError(f"{source}: history entry {(sigma, q, steps)} contradicts the ledger parameters")
        return cls(parsed.params, source, [tuple(h) for h in parsed.history], parsed.rounds_done)

    @classmethod
    def open(cls, path: Path | str | None, params: LedgerParams) -> PrivacyLedger:
        """Resume the ledger at ``path`` (it must match ``params``) or start and persist a new one."""
        if path is None:
            return cls(params)
        target = Path(path)
        if target.exists():
            ledger = cls.load(target)
            ledger.check_params(params)
            logger.info(
                "privacy ledger %s resumed: %d round(s) done, epsilon %.4f of %.4f",
                target, ledger.rounds_done, ledger.epsilon_spent(), params.target_epsilon,
            )
            return ledger
        ledger = cls(params, target)
        ledger.save()
        return ledger

    def save(self) -> None:
        """Atomic replace so a crash leaves either the old or the new ledger, never a torn one."""
        if self.path is None:
            return
        payload = _LedgerFile(
            schema_version=SCHEMA_VERSION, params=self.params, history=self.history, rounds_done=self.rounds_done
        ).model_dump(mode="json")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, indent=2)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def check_params(self, params: LedgerParams) -> None:
        mine = self.params
        problems = []
        if not _close(mine.noise_multiplier, params.noise_multiplier):
            problems.append(f"noise multiplier {params.noise_multiplier:g} != ledger's {mine.noise_multiplier:g}")
        if not _close(mine.sample_rate, params.sample_rate):
            problems.append(f"sample rate {params.sample_rate:g} != ledger's {mine.sample_rate:g}")
        if not _close(mine.delta, params.delta):
            problems.append(f"delta {params.delta:g} != ledger's {mine.delta:g}")
        if not _close(mine.target_epsilon, params.target_epsilon):
            problems.append(f"target epsilon {params.target_epsilon:g} != ledger's {mine.target_epsilon:g}")
        if problems:
            where = self.path or "in-memory ledger"
            raise LedgerConfigMismatch(f"{where}: DP configuration differs from the ledger's: " + "; ".join(problems))

    # ---------------------------------------------------------------- accounting
    @property
    def target_epsilon(self) -> float:
        return self.params.target_epsilon

    @staticmethod
    def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
        """Same result as an Opacus ``RDPAccountant`` holding ``history``, computed faster.

        RDP is additive in steps, so each (sigma, q) pair's one-step RDP curve is computed once
        (the expensive part) and scaled by its total steps; epsilon then costs microseconds.
        """
        if not history:
            return 0.0
        merged: dict[tuple[float, float], int] = {}
        for sigma, q, steps in history:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
        rdp = sum(_rdp_per_step(sigma, q) * steps for (sigma, q), steps in merged.items())
        with warnings.catch_warnings():
            # Large budgets hit the top default RDP order; the bound stays valid, just not tightest.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            eps, _ = privacy_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)

    def epsilon_spent(self, delta: float | None = None) -> float:
        return self._epsilon(self.history, self.params.delta if delta is None else delta)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Epsilon if one more round of these parameters were recorded."""
        return self._epsilon([*self.history, (noise_multiplier, sample_rate, steps)], self.params.delta)

    def _next_round_epsilon(self) -> float:
        return self.epsilon_after(self.params.noise_multiplier, self.params.sample_rate, self.params.steps_per_round)

    def can_contribute(self) -> bool:
        return self._next_round_epsilon() <= self.target_epsilon + _EPS_SLACK

    def ensure_can_contribute(self) -> None:
        """Raise before spending compute on a round that could never be published."""
        upcoming = self._next_round_epsilon()
        if upcoming > self.target_epsilon + _EPS_SLACK:
            raise PrivacyBudgetExhausted(self.epsilon_spent(), upcoming, self.target_epsilon, self.rounds_done)

    def record_round(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Charge one round and persist it; callers publish the update only after this returns."""
        if not (_close(noise_multiplier, self.params.noise_multiplier) and _close(sample_rate, self.params.sample_rate)):
            raise LedgerConfigMismatch(
                f"round with noise {noise_multiplier:g}, sample rate {sample_rate:g} does not match the ledger's "
                f"{self.params.noise_multiplier:g}, {self.params.sample_rate:g}"
            )
        if steps < 1:
            raise ValueError("a round has at least one step")
        upcoming = self.epsilon_after(noise_multiplier, sample_rate, steps)
        if upcoming > self.target_epsilon + _EPS_SLACK:
            raise PrivacyBudgetExhausted(self.epsilon_spent(), upcoming, self.target_epsilon, self.rounds_done)
        self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))
        self.rounds_done += 1
        self.save()
        logger.info("privacy ledger: round %d recorded, epsilon %.4f of %.4f", self.rounds_done, upcoming, self.target_epsilon)
        return upcoming
