"""One round of local training from the global weights, with DP-SGD unless the config disables it.

Order matters for privacy: the ledger must show budget left before training, and the round
is charged (and persisted) before the weights are handed back for publication.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fedmq.site_agent.models import build_model, trained_part
from fedmq.site_agent.training.augment import augment
from fedmq.site_agent.training.config import TrainingConfig
from fedmq.site_agent.training.device import resolve_device
from fedmq.site_agent.training.dp import ledger_params_for, strip_opacus_prefix
from fedmq.site_agent.training.engines import make_engine
from fedmq.site_agent.training.errors import TrainingError
from fedmq.site_agent.training.ledger import LedgerParams, PrivacyLedger
from fedmq.site_agent.training.rng import DPRandom, SecureRandom, SeededRandom

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
        #: resolved here, before any ledger is opened: a missing GPU stops the site before budget is spent
        self.device = resolve_device(config.device)
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
        device = self.device
        t0 = time.perf_counter()
        n = int(X.shape[0])
        if n == 0 or int(y.reshape(-1).shape[0]) != n:
            raise TrainingError(f"need a non-empty dataset with one label per image (got {n} images, {y.numel()} labels)")
        # Data moves to the device once per round; every step indexes it there.
        X = X.detach().to(device=device, dtype=torch.float32).contiguous()
        y = y.detach().reshape(-1).to(device=device, dtype=torch.float32)
        _sync(device)
        timings = {"data_load_s": float(data_load_s), "data_prep_s": time.perf_counter() - t0}

        t_setup = time.perf_counter()
        ledger = None
        if cfg.dp.enabled:
            ledger = self.open_ledger(n)
            ledger.ensure_can_contribute()
        model = build_model(cfg.model, cfg.seed)
        if initial_state is not None:
            model.load_state_dict(strip_opacus_prefix(initial_state), strict=True)
        model.to(device).train()
        # a fixed front end (scatternet) runs once per dataset, not at every step; with views it runs
        # per view, on the shifted images
        net, inputs = (model, X) if cfg.augmentations else trained_part(model, X)
        optimizer = self._optimizer([p for p in model.parameters() if p.requires_grad])
        pos_weight = torch.tensor([cfg.pos_weight], device=device) if cfg.pos_weight is not None else None
        criterion = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
        steps = cfg.steps_per_round(n)
        physical = cfg.physical_batch()
        rng = self._random(round_index, device)
        views = max(1, cfg.augmentations)
        # views of one example travel in the same micro-batch, so a micro-batch holds physical // K examples
        per_chunk = max(1, physical // views)
        aug_gen = torch.Generator().manual_seed(_round_seed(cfg.seed, round_index, 3)) if cfg.augmentations else None

        def batch(chunk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if aug_gen is None:
                return inputs[chunk], y[chunk]
            return augment(X[chunk], views, aug_gen), y[chunk].repeat_interleave(views)

        engine = None
        if ledger is not None:
            engine = make_engine(cfg.dp.engine, net, cfg.dp.max_grad_norm)
            n_values = sum(p.numel() for p in engine.params)
        timings["setup_s"] = time.perf_counter() - t_setup

        fb_s = noise_s = opt_s = 0.0
        images = 0
        losses: list[float] = []
        order = torch.empty(0, dtype=torch.long, device=device)
        cursor = 0
        t_train = time.perf_counter()
        try:
            for step in tqdm(range(steps), desc=f"round {round_index}", disable=not self.progress, leave=False):
                if self.progress_every and step and step % self.progress_every == 0:
                    # a service has no terminal for tqdm: one line every N steps in long rounds
                    logger.info("round %d: step %d of %d, mean loss so far %.4f", round_index, step, steps,
                                sum(losses) / max(1, len(losses)), extra={"step": step, "steps": steps})
                t = time.perf_counter()
                if engine is not None:
                    assert ledger is not None
                    # Poisson sampling: each example joins the batch independently with probability q,
                    # which is what the RDP analysis of the subsampled Gaussian assumes.
                    idx = torch.nonzero(rng.uniform(n, device) < ledger.params.sample_rate).reshape(-1)
                    images += len(idx)
                    sums = [torch.zeros_like(p) for p in engine.params]
                    loss_sum = 0.0
                    for chunk in idx.split(per_chunk):
                        loss_sum += engine.accumulate(*batch(chunk), criterion, sums, group=views)
                    _sync(device)
                    fb_s += time.perf_counter() - t
                    if len(idx):
                        losses.append(loss_sum / len(idx))
                    t = time.perf_counter()
                    # One noise draw per logical batch, then Opacus' scaling by the expected batch size.
                    std = ledger.params.noise_multiplier * cfg.dp.max_grad_norm
                    expected = max(1, round(ledger.params.sample_rate * n))
                    noise = rng.normal((n_values,), std, device)  # one draw for the whole model
                    offset = 0
                    for p, total in zip(engine.params, sums):
                        k = total.numel()
                        p.grad = (total + noise[offset : offset + k].view_as(total)) / expected
                        offset += k
                    _sync(device)
                    noise_s += time.perf_counter() - t
                else:
                    if cursor >= len(order):
                        order, cursor = rng.permutation(n, device), 0
                    idx = order[cursor : cursor + cfg.batch_size]
                    cursor += cfg.batch_size
                    images += len(idx)
                    optimizer.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    for chunk in idx.split(per_chunk):
                        xb, yb = batch(chunk)
                        loss = criterion(net(xb).reshape(-1), yb) / (len(idx) * views)
                        loss.backward()
                        loss_sum += float(loss.detach())
                    _sync(device)
                    fb_s += time.perf_counter() - t
                    losses.append(loss_sum)
                t = time.perf_counter()
                optimizer.step()
                _sync(device)
                opt_s += time.perf_counter() - t
        except torch.OutOfMemoryError as exc:
            raise TrainingError(
                f"{device} ran out of memory at max_physical_batch = {physical} ({cfg.model}): lower "
                f"max_physical_batch (the privacy accounting does not depend on it); nothing was charged. {exc}"
            ) from None
        finally:
            if engine is not None:
                engine.close()
        clip_s = engine.clip_s if engine is not None else 0.0
        timings.update(
            {
                "train_s": time.perf_counter() - t_train,
                "forward_backward_s": fb_s - clip_s,
                "dp_clip_s": clip_s,
                "dp_noise_s": noise_s,
                "dp_clip_noise_s": clip_s + noise_s,
                "optimizer_s": opt_s,
                "physical_batch": float(physical),
                "images": float(images),
            }
        )

        state = {k: v.detach().to("cpu", copy=True) for k, v in strip_opacus_prefix(model.state_dict()).items()}
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
            "round %d: %d samples, %d steps, loss %.4f, epsilon %s, %.2fs on %s",
            round_index, n, steps, result.mean_loss,
            f"{result.epsilon:.3f}" if result.epsilon is not None else "n/a (DP off)", timings["total_s"], device,
        )
        return result

    def _random(self, round_index: int, device: torch.device) -> DPRandom:
        """Secure (ChaCha20, OS key, fresh per round) or seeded per (seed, round) streams."""
        if self.config.dp.secure_noise:
            return SecureRandom()
        cfg = self.config
        return SeededRandom(_round_seed(cfg.seed, round_index, 1), _round_seed(cfg.seed, round_index, 2), device)


def _sync(device: torch.device) -> None:
    # Timings split per phase are only honest once queued GPU work has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
