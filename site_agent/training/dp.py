"""DP-SGD plumbing: one noise multiplier for the whole federation (the engines live in engines.py).

The noise multiplier is derived once from the site's total budget over all planned rounds,
so each round costs the same and the ledger can say in advance whether one more fits.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping

import torch
from opacus.accountants.utils import get_noise_multiplier

from fedmq.site_agent.training.config import DPConfig, TrainingConfig
from fedmq.site_agent.training.ledger import LedgerParams

logger = logging.getLogger(__name__)

OPACUS_PREFIX = "_module."


def noise_multiplier_for(dp: DPConfig, delta: float, sample_rate: float, steps_per_round: int) -> float:
    """Smallest sigma (RDP) keeping ``planned_rounds`` rounds within ``target_epsilon``."""
    return _noise_multiplier(dp.target_epsilon, delta, sample_rate, dp.planned_rounds, steps_per_round)


@functools.lru_cache(maxsize=32)
def _noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, rounds: int, steps_per_round: int) -> float:
    # Pure and slow (seconds: a binary search over RDP curves), hence memoised per process.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=rounds * steps_per_round,
            accountant="rdp",
            epsilon_tolerance=0.01,
        )
    logger.info(
        "noise multiplier %.4f for epsilon %.3g, delta %.3g, q %.4g, %d rounds x %d steps",
        sigma, target_epsilon, delta, sample_rate, rounds, steps_per_round,
    )
    return float(sigma)


def ledger_params_for(config: TrainingConfig, n_samples: int) -> LedgerParams:
    """Everything the ledger binds itself to, computed from the config and the local dataset size."""
    delta = config.dp.resolve_delta(n_samples)
    sample_rate = config.sample_rate(n_samples)
    steps = config.steps_per_round(n_samples)
    sigma = noise_multiplier_for(config.dp, delta, sample_rate, steps)
    return LedgerParams(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        delta=delta,
        target_epsilon=config.dp.target_epsilon,
        steps_per_round=steps,
        planned_rounds=config.dp.planned_rounds,
    )


def strip_opacus_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as the plain model names them, whatever wrapper produced the state."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        while key.startswith(OPACUS_PREFIX):
            key = key[len(OPACUS_PREFIX) :]
        out[key] = value
    return out
