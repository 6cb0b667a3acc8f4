"""One round of local training from the global weights, with DP-SGD unless the config disables it.

Order matters for privacy: the ledger must show budget left before training, and the round
is charged (and persisted) before the weights are handed back for publication.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from site_agent.models import build_model
from site_agent.training.config import TrainingConfig
from site_agent.training.dp import ledger_params_for, make_private, release, strip_opacus_prefix
from site_agent.training.errors import TrainingError
from site_agent.training.ledger import LedgerParams, PrivacyLedger

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a site may publish after a round, plus what it spent to produce it."""

    state_dict: dict[str, torch.Tensor]
    n_samples: int
    steps: int
    mean_loss: float
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _round_seed(seed: int, round_index: int, stream: int) -> int:
    # Distinct, reproducible streams per (seed, round, purpose) without Python's salted hash().
    return (seed * 1_000_003 + round_index * 7_919 + stream * 104_729) % (2**63 - 1)


class LocalTrainer:
    """Trains ``config.model`` for one round; holds the site's privacy ledger across rounds."""

    def __init__(
        self,
        config: TrainingConfig,
        ledger_path: Path | str | None = None,
        *,
        progress: bool = False,
        num_threads: int | None = None,
    ) -> None:
        """``num_threads``: torch intra-op threads during a round (restored afterwards). Several sites
        sharing a small machine train far faster with 1 than with oversubscribed defaults."""
        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        self.num_threads = num_threads
        self.config = config
        self.ledger_path = Path(ledger_path) if ledger_path is not None else None
        self.progress = progress
        #: log a progress line every this many steps (0 = off); set by the site service
        self.progress_every = 0
        self.ledger: PrivacyLedger | None = None
        self._params: dict[int, LedgerParams] = {}  # the sigma search is slow; its inputs rarely change

    def open_ledger(self, n_samples: int) -> PrivacyLedger:
        """Bind the ledger to this dataset's sample rate and the noise multiplier derived from the budget."""
        params = self._params.get(n_samples)
        if params is None:
            params = self._params[n_samples] = ledger_params_for(self.config, n_samples)
        if self.ledger is None:
            self.ledger = PrivacyLedger.open(self.ledger_path, params)
        else:
            self.ledger.check_params(params)
        return self.ledger

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        cfg = self.config
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_round(
        self,
        initial_state: Mapping[str, torch.Tensor] | None,
        X: torch.Tensor,
        y: torch.Tensor,
        *,
        round_index: int = 0,
        data_load_s: float = 0.0,
    ) -> RoundResult:
        """Train from ``initial_state`` (None: the preset's seeded init) and return plain-model weights.

        Raises ``PrivacyBudgetExhausted`` before any compute when DP is on and the budget is spent.
        """
        if self.num_threads is None:
            return self._train_round(initial_state, X, y, round_index, data_load_s)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            return self._train_round(initial_state, X, y, round_index, data_load_s)
        finally:
            torch.set_num_threads(previous)

    def _train_round(
        self,
        initial_state: Mapping[str, torch.Tensor] | None,
        X: torch.Tensor,
        y: torch.Tensor,
        round_index: int,
        data_load_s: float,
    ) -> RoundResult:
        cfg = self.config
        t0 = time.perf_counter()
        X = X.detach().to(torch.float32).contiguous()
        y = y.detach().reshape(-1).to(torch.float32)
        n = int(X.shape[0])
        if n == 0 or int(y.shape[0]) != n:
            raise TrainingError(f"need a non-empty dataset with one label per image (got {n} images, {len(y)} labels)")
        timings = {"data_load_s": float(data_load_s), "data_prep_s": time.perf_counter() - t0}

        t_setup = time.perf_counter()
        ledger = None
        if cfg.dp.enabled:
            ledger = self.open_ledger(n)
            ledger.ensure_can_contribute()
        model = build_model(cfg.model, cfg.seed)
        if initial_state is not None:
            model.load_state_dict(strip_opacus_prefix(initial_state), strict=True)
        model.train()
        optimizer = self._optimizer([p for p in model.parameters() if p.requires_grad])
        pos_weight = torch.tensor([cfg.pos_weight]) if cfg.pos_weight is not None else None
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        steps = cfg.steps_per_round(n)
        sample_gen = torch.Generator().manual_seed(_round_seed(cfg.seed, round_index, 1))

        wrapped = None
        dp_optimizer = None
        if ledger is not None:
            noise_gen = torch.Generator().manual_seed(_round_seed(cfg.seed, round_index, 2))
            wrapped, dp_optimizer = make_private(
                model,
                optimizer,
                noise_multiplier=ledger.params.noise_multiplier,
                max_grad_norm=cfg.dp.max_grad_norm,
                expected_batch_size=max(1, round(ledger.params.sample_rate * n)),
                generator=noise_gen,
            )
        timings["setup_s"] = time.perf_counter() - t_setup

        forward_model: nn.Module = wrapped if wrapped is not None else model
        fb_s = dp_s = opt_s = 0.0
        losses: list[float] = []
        order = torch.empty(0, dtype=torch.long)
        cursor = 0
        t_train = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # Opacus' hooks fire on the first layer, whose input needs no grad; harmless and noisy.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for step in tqdm(range(steps), desc=f"round {round_index}", disable=not self.progress, leave=False):
                    if self.progress_every and step and step % self.progress_every == 0:
                        # a service has no terminal for tqdm: one line every N steps in long rounds
                        logger.info("round %d: step %d of %d, mean loss so far %.4f", round_index, step, steps,
                                    sum(losses) / max(1, len(losses)), extra={"step": step, "steps": steps})
                    if dp_optimizer is not None:
                        # Poisson sampling: each example joins the batch independently with probability q,
                        # which is what the RDP analysis of the subsampled Gaussian assumes.
                        idx = torch.nonzero(torch.rand(n, generator=sample_gen) < ledger.params.sample_rate).reshape(-1)
                    else:
                        if cursor >= len(order):
                            order, cursor = torch.randperm(n, generator=sample_gen), 0
                        idx = order[cursor : cursor + cfg.batch_size]
                        cursor += cfg.batch_size
                    xb, yb = X[idx], y[idx]
                    t = time.perf_counter()
                    (dp_optimizer if dp_optimizer is not None else optimizer).zero_grad(set_to_none=True)
                    logits = forward_model(xb).reshape(-1)
                    loss = criterion(logits, yb) if len(idx) else logits.sum()
                    loss.backward()
                    fb_s += time.perf_counter() - t
                    if len(idx):
                        losses.append(float(loss.detach()))
                    t = time.perf_counter()
                    if dp_optimizer is not None:
                        proceed = dp_optimizer.pre_step()  # clip per sample, add noise, average
                        dp_s += time.perf_counter() - t
                        t = time.perf_counter()
                        if proceed:
                            optimizer.step()
                    else:
                        optimizer.step()
                    opt_s += time.perf_counter() - t
        finally:
            if wrapped is not None:
                release(wrapped)
        timings.update(
            {"train_s": time.perf_counter() - t_train, "forward_backward_s": fb_s, "dp_clip_noise_s": dp_s, "optimizer_s": opt_s}
        )

        state = {k: v.detach().clone() for k, v in strip_opacus_prefix(model.state_dict()).items()}
        result = RoundResult(
            state_dict=state,
            n_samples=n,
            steps=steps,
            mean_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
            timings=timings,
        )
        if ledger is not None:
            t = time.perf_counter()
            # Persisted before returning: the caller may publish as soon as it has the result.
            result.epsilon = ledger.record_round(ledger.params.noise_multiplier, ledger.params.sample_rate, steps)
            result.delta = ledger.params.delta
            result.noise_multiplier = ledger.params.noise_multiplier
            result.sample_rate = ledger.params.sample_rate
            timings["ledger_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t0
        logger.info(
            "round %d: %d samples, %d steps, loss %.4f, epsilon %s, %.2fs",
            round_index, n, steps, result.mean_loss,
            f"{result.epsilon:.3f}" if result.epsilon is not None else "n/a (DP off)", timings["total_s"],
        )
        return result
