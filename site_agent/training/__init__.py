"""Local training for one federated round: config, DP-SGD, privacy ledger, evaluation."""

from fedmq.site_agent.training.config import DPConfig, TrainingConfig
from fedmq.site_agent.training.dp import ledger_params_for, noise_multiplier_for, strip_opacus_prefix
from fedmq.site_agent.training.errors import LedgerConfigMismatch, LedgerError, PrivacyBudgetExhausted, TrainingError
from fedmq.site_agent.training.evaluate import evaluate, predict_proba
from fedmq.site_agent.training.ledger import SCHEMA_VERSION, LedgerParams, PrivacyLedger
from fedmq.site_agent.training.trainer import LocalTrainer, RoundResult

__all__ = [
    "SCHEMA_VERSION",
    "DPConfig",
    "LedgerConfigMismatch",
    "LedgerError",
    "LedgerParams",
    "LocalTrainer",
    "PrivacyBudgetExhausted",
    "PrivacyLedger",
    "RoundResult",
    "TrainingConfig",
    "TrainingError",
    "evaluate",
    "ledger_params_for",
    "noise_multiplier_for",
    "predict_proba",
    "strip_opacus_prefix",
]
