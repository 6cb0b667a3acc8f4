"""Everything a site agent holds in memory, and the one local round it runs at a time.

Kept apart from ``service`` (which owns the broker connection) so the round logic can be
driven without a broker: by tests, by experiments, and by ``fedmq site export-model``.
"""

from __future__ import annotations

import hashlib
import secrets
import io
import logging
import os
import threading
import time

import numpy as np
from torch import nn

from shared.ckks import LoadedContext, load_context
from shared.codec import encode_update_chunk
from shared.errors import ConfigError
from shared.atomic import atomic_write_bytes
from shared.signing import load_private_key
from shared.sparsify import sparsify
from site_agent.data import LoadedDataset, load_dataset
from site_agent.model_state import FederatedModel, model_vector
from site_agent.settings import SiteSettings
from site_agent.state import SiteState, SiteStateStore
from site_agent.training import DPConfig, LocalTrainer, PrivacyBudgetExhausted, TrainingConfig, evaluate
from site_agent.training.device import resolve_device
from site_agent.update_builder import UpdateIdentity, build_update

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
#: Test hook (never set in production): ``FEDMQ_SITE_RECORD_PLAINTEXT=1`` also writes each built
#: update's plaintext sparse delta to ``<state_dir>/plaintext/<seq>.npz`` (indices, blocks) before
#: the update is persisted as pending, so fault-injection tests can replay exactly what was sent.
RECORD_PLAINTEXT_ENV = "FEDMQ_SITE_RECORD_PLAINTEXT"


def training_seed(site_id: str, seed: int) -> int:
    """Distinct sampling/noise streams per site: equal seeds would correlate the sites' DP noise."""
    return int.from_bytes(hashlib.sha256(f"{site_id}:{seed}".encode()).digest()[:6], "big")


def training_config(settings: SiteSettings) -> TrainingConfig:
    return TrainingConfig(
        model=settings.model_preset,
        lr=settings.lr,
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        dp=DPConfig(
            enabled=settings.dp_enabled,
            target_epsilon=settings.target_epsilon,
            delta=settings.target_delta,
            max_grad_norm=settings.max_grad_norm,
            planned_rounds=settings.planned_rounds,
            engine=settings.dp_engine,
            secure_noise=bool(settings.secure_noise),
        ),
        seed=training_seed(settings.site_id, settings.seed) if settings.reproducible_noise else secrets.randbits(62),
        device=settings.device,
        max_physical_batch=settings.max_physical_batch,
    )


class SiteRuntime:
    def __init__(
        self,
        settings: SiteSettings,
        ctx: LoadedContext,
        model: FederatedModel,
        store: SiteStateStore,
        state: SiteState,
        train: LoadedDataset | None,
        val: LoadedDataset | None,
    ) -> None:
        self.settings = settings
        self.ctx = ctx
        self.model = model
        self.layout = model.layout
        self.store = store
        self.state = state
        self.train = train
        self.val = val
        self.signing_key = load_private_key(settings.signing_key)
        self.trainer = LocalTrainer(training_config(settings), store.dir / LEDGER_FILE, progress=settings.progress_bars)
        self.last_timings: dict[str, float] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, settings: SiteSettings, *, load_data: bool = True) -> "SiteRuntime":
        resolve_device(settings.device)  # a missing GPU stops the site here, before any budget is touched
        ctx = load_context(settings.secret_context, require_secret=True)
        model = FederatedModel.create(settings.model_preset, settings.init_seed, settings.init_weights)
        store = SiteStateStore(settings.state_dir)
        if store.exists():
            state = store.load(settings.site_id, ctx.fingerprint, model.layout.fingerprint)
            logger.info("resumed site state", extra={"version": state.version, "next_seq": state.next_seq})
        else:
            state = SiteState(settings.site_id, ctx.fingerprint, model.layout.fingerprint)
        train = val = None
        if load_data:
            train = load_dataset(settings.manifest, settings.image_size, settings.train_split)
            val = load_dataset(settings.manifest, settings.image_size, settings.val_split)
            for name, ds in (("train", train), ("val", val)):
                logger.info(
                    "loaded local data",
                    extra={"split": name, "n": len(ds), "skipped": ds.n_skipped, "seconds": round(ds.load_seconds, 2)},
                )
                for path, reason in ds.skipped:
                    logger.warning("skipped unreadable image", extra={"path": path, "reason": reason})
            if len(train) == 0:
                raise ConfigError(f"no readable training images in {settings.manifest}")
        return cls(settings, ctx, model, store, state, train, val)

    # -- model ---------------------------------------------------------------------------
    def current_vector(self) -> np.ndarray:
        return model_vector(self.model.x0, self.state.global_sum, self.state.value_scale)

    def current_model(self) -> nn.Module:
        return self.model.to_module(self.current_vector())

    def save_state(self) -> None:
        with self._lock:
            self.store.save(self.state)

    def evaluate_current(self) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {"n": 0}
        return evaluate(self.current_model(), self.val.X, self.val.y, device=self.trainer.device)

    # -- privacy -------------------------------------------------------------------------
    def epsilon_spent(self) -> float:
        if not self.settings.dp_enabled or self.train is None:
            return 0.0
        return float(self.trainer.open_ledger(len(self.train)).epsilon_spent())

    def why_not_contribute(self) -> str | None:
        if self.state.updates_sent >= self.settings.planned_rounds:
            return f"planned rounds done ({self.state.updates_sent})"
        if self.settings.dp_enabled and self.train is not None:
            ledger = self.trainer.open_ledger(len(self.train))
            if not ledger.can_contribute():
                return f"privacy budget spent (epsilon {ledger.epsilon_spent():.3f} of {ledger.target_epsilon})"
        return None

    # -- one round -------------------------------------------------------------------------
    def train_and_build(
        self, base_version: int, stop: threading.Event | None = None, shard_versions: tuple[int, ...] | None = None
    ) -> bool:
        """Train from the current global model, charge the ledger, encrypt, persist as pending.

        Returns False when the budget is spent. Runs on the worker thread; touches no socket.
        """
        assert self.train is not None
        started = time.perf_counter()
        base = self.current_vector()
        try:
            result = self.trainer.train_round(
                self.layout.unflatten(base), self.train.X, self.train.y, round_index=self.state.next_seq,
                data_load_s=self.train.load_seconds if self.state.next_seq == 1 else 0.0,
            )
        except PrivacyBudgetExhausted as exc:
            logger.warning("privacy budget exhausted; no longer contributing", extra={"detail": str(exc)})
            return False
        train_wall = time.perf_counter() - started
        if self.settings.slowdown_factor > 1.0 and not (stop and stop.is_set()):
            # Straggler emulation for experiments: stretch the round as a slower machine would.
            (stop or threading.Event()).wait(train_wall * (self.settings.slowdown_factor - 1.0))
        delta = self.layout.flatten(result.state_dict) - base
        seq = self.state.next_seq
        built = build_update(
            delta,
            self.state.residual,
            UpdateIdentity(self.settings.site_id, seq, base_version, float(result.n_samples)),
            self.ctx,
            self.layout.fingerprint,
            self.signing_key,
            mode=self.settings.sparsity_mode,
            fraction=self.settings.topk_fraction,
            max_message_bytes=self.settings.max_message_bytes,
            shard_count=self.settings.shard_count,
            shard_base_versions=shard_versions,
        )
        encoded = [encode_update_chunk(c) for c in built.chunks]
        if os.environ.get(RECORD_PLAINTEXT_ENV, "") == "1":
            self._record_plaintext(seq, delta, base_version, float(result.n_samples))
        with self._lock:
            self.state.residual = built.residual
            self.state.pending = encoded
            self.state.pending_seq = seq
            self.state.next_seq = seq + 1
            self.state.last_trained_base = base_version
            self.store.save(self.state)
        self.last_timings = {
            **{k: round(v, 4) for k, v in result.timings.items()},
            "encrypt_s": round(built.encrypt_seconds, 4),
            "round_wall_s": round(time.perf_counter() - started, 4),
            "bytes": float(sum(map(len, encoded))),
        }
        logger.info("update ready", extra={"seq": seq, "base_version": base_version, "blocks": len(built.sent_indices), **self.last_timings})
        return True

    def _record_plaintext(self, seq: int, delta: np.ndarray, base_version: int, sample_weight: float) -> None:
        """Test hook only (RECORD_PLAINTEXT_ENV): the exact sparse blocks the update encrypts."""
        sparse, _ = sparsify(delta, self.state.residual, self.ctx.preset.slots, self.settings.sparsity_mode, self.settings.topk_fraction)
        buf = io.BytesIO()
        np.savez(buf, indices=np.asarray(sparse.indices, dtype=np.int64), blocks=sparse.blocks,
                 base_version=base_version, sample_weight=sample_weight)
        atomic_write_bytes(self.store.dir / "plaintext" / f"{seq}.npz", buf.getvalue())

    def mark_pending_published(self) -> None:
        with self._lock:
            sent = sum(map(len, self.state.pending or []))
            self.state.pending = None
            self.state.pending_seq = None
            self.state.updates_sent += 1
            self.state.bytes_sent += sent
            self.store.save(self.state)


__all__ = ["SiteRuntime", "training_config"]
