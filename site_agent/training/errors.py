"""Exceptions of local training, so the site service can tell 'budget spent' from a bug."""

from __future__ import annotations

from fedmq.shared.errors import FedmqError


class TrainingError(FedmqError):
    """Base class for refusals of the local trainer."""


class PrivacyBudgetExhausted(TrainingError):
    """Another round would push this site's epsilon past its target; it must stop contributing."""

    def __init__(self, epsilon_spent: float, epsilon_next: float, target_epsilon: float, rounds_done: int) -> None:
        self.epsilon_spent = epsilon_spent
        self.epsilon_next = epsilon_next
        self.target_epsilon = target_epsilon
        self.rounds_done = rounds_done
        super().__init__(
            f"privacy budget exhausted after {rounds_done} round(s): epsilon spent {epsilon_spent:.4f}, "
            f"next round would reach {epsilon_next:.4f} > target {target_epsilon:.4f}"
        )


class LedgerError(TrainingError):
    """The privacy ledger file cannot be trusted (corrupt, unknown schema, other DP configuration)."""


class LedgerConfigMismatch(LedgerError):
    """The ledger on disk was written for different DP parameters; mixing them would misreport epsilon."""
