"""Everything a site agent holds in memory, and the one local round it runs at a time.

Kept apart from ``service`` (which owns the broker connection) so the round logic can be
driven without a broker: by tests, by experiments, and by ``fedmq site export-model``.
"""

from __future__ import annotations

import hashlib
import secrets
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from fedmq.shared.audit import record_own_updates
from fedmq.shared.ckks import LoadedContext, load_context
from fedmq.shared.codec import encode_update_chunk
from fedmq.shared.errors import ConfigError
from fedmq.shared.signing import load_private_key
from fedmq.shared.statelock import StateDirLock, lock_state_dir
from fedmq.site_agent.data import LoadedDataset, load_dataset
from fedmq.site_agent.guard import GUARD_FILE, DivergenceGuard, PauseFile
from fedmq.site_agent.model_state import FederatedModel, model_vector
from fedmq.site_agent.settings import SiteSettings
from fedmq.site_agent.state import SiteState, SiteStateStore
from fedmq.site_agent.state_owner import SiteStateOwner, StateView
from fedmq.site_agent.training import DPConfig, LocalTrainer, PrivacyBudgetExhausted, TrainingConfig, evaluate
from fedmq.site_agent.training.device import resolve_device
from fedmq.site_agent.update_builder import UpdateIdentity, build_update

logger = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.json"
#: A test seam: ``SiteRuntime.update_built_hook(runtime, seq, delta, base_version, sample_weight)``
#: runs after an update is built and before the runtime's state (residual) moves on. Nothing in
#: fedmq sets it and no setting or environment variable can: only a test that builds the runtime
#: itself (tests/launcher.py) injects one, e.g. to record what was sent for an exactly-once check.
UpdateBuiltHook = Callable[["SiteRuntime", int, np.ndarray, int, float], None]


def training_seed(site_id: str, seed: int) -> int:
    """Distinct sampling/noise streams per site: equal seeds would correlate the sites' DP noise."""
    return int.from_bytes(hashlib.sha256(f"{site_id}:{seed}".encode()).digest()[:6], "big")


def training_config(settings: SiteSettings) -> TrainingConfig:
    return TrainingConfig(
        model=settings.model_preset,
        lr=settings.lr,
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        local_steps=settings.local_steps,
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        augmentations=settings.augmentations,
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
        #: the one owner of the mutable site state (site_agent/state_owner.py)
        self.owner = SiteStateOwner(state, store)
        self.train = train
        self.val = val
        self.signing_key = load_private_key(settings.signing_key)
        self.trainer = LocalTrainer(training_config(settings), store.dir / LEDGER_FILE, progress=settings.progress_bars)
        self.trainer.progress_every = settings.progress_every_steps
        self.last_timings: dict[str, float] = {}
        self.update_built_hook: UpdateBuiltHook | None = None
        self.guard = DivergenceGuard.open(store.dir / GUARD_FILE, settings.divergence_loss_factor,
                                          settings.divergence_flat_auc_versions)
        self.pause_file = PauseFile(store.dir)
        self.dir_lock: StateDirLock | None = None

    @classmethod
    def open(cls, settings: SiteSettings, *, load_data: bool = True, lock: bool = True) -> "SiteRuntime":
        """``lock``: hold the state directory for this process (``fedmq site run``); read-only
        tools (export-model) pass False so they can run beside the service."""
        resolve_device(settings.device)  # a missing GPU stops the site here, before any budget is touched
        dir_lock = lock_state_dir(settings.state_dir, "site") if lock else None
        try:
            rt = cls._open(settings, load_data)
        except BaseException:
            if dir_lock is not None:
                dir_lock.release()
            raise
        rt.dir_lock = dir_lock
        return rt

    @classmethod
    def _open(cls, settings: SiteSettings, load_data: bool) -> "SiteRuntime":
        ctx = load_context(settings.secret_context, require_secret=True)
        model = FederatedModel.create(settings.model_preset, settings.init_seed, settings.init_weights)
        store = SiteStateStore(settings.state_dir)
        check_ledger_present(settings, store)
        if store.exists():
            state = store.load(settings.site_id, ctx.fingerprint, model.layout.fingerprint)
            logger.info("resumed site state", extra={"version": state.version, "next_seq": state.next_seq})
        else:
            state = SiteState(settings.site_id, ctx.fingerprint, model.layout.fingerprint)
        train = val = None
        if load_data:
            train, val = load_site_data(settings)
        return cls(settings, ctx, model, store, state, train, val)

    # -- model ---------------------------------------------------------------------------
    @property
    def state(self) -> StateView:
        """A consistent copy of the state's scalar fields (writes go through ``self.owner``)."""
        return self.owner.view()

    def current_vector(self) -> np.ndarray:
        global_sum, value_scale = self.owner.model_sum()
        return model_vector(self.model.x0, global_sum, value_scale)

    def current_model(self) -> nn.Module:
        return self.model.to_module(self.current_vector())

    def save_state(self) -> None:
        self.owner.save()

    def evaluate_current(self) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {"n": 0}
        return evaluate(self.current_model(), self.val.X, self.val.y, device=self.trainer.device)

    # -- privacy -------------------------------------------------------------------------
    def epsilon_spent(self) -> float:
        if not self.settings.dp_enabled or self.train is None:
            return 0.0
        return float(self.trainer.open_ledger(len(self.train)).epsilon_spent())

    def observe_version(self, metrics: dict[str, float]) -> str | None:
        """Feed the divergence guard one evaluated version; returns the alert in force, if any."""
        before = self.guard.alert
        alert = self.guard.observe(self.state.version, metrics.get("loss"), metrics.get("auc"))
        if alert and alert != before:
            logger.error("global model diverged: pausing contributions (no privacy budget is spent until a "
                         "healthy version arrives)", extra={"alert": alert, "version": self.state.version})
        elif before and not alert:
            logger.warning("global model healthy again: contributing again", extra={"version": self.state.version})
        return alert

    def alert(self) -> str | None:
        """What a person should look at, as the site reports it to the aggregator's status."""
        paused = self.pause_file.reason()
        if paused:
            return f"paused: {paused}"
        return f"paused: {self.guard.alert}" if self.guard.alert else None

    def why_not_contribute(self) -> str | None:
        paused = self.pause_file.reason()
        if paused:
            return f"paused until `fedmq site resume`: {paused}"
        if self.guard.alert:
            return f"paused: {self.guard.alert}"
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
        paused = self.pause_file.reason() or self.guard.alert
        if paused:  # checked again here: nothing is charged on a paused site
            logger.warning("not training: paused", extra={"reason": paused})
            return False
        started = time.perf_counter()
        global_sum, value_scale, view = self.owner.training_base()
        if view.version != base_version or (shard_versions is not None and view.shard_versions != tuple(shard_versions)):
            # a version was applied between the service's decision and this read: the update
            # names the version its model really came from
            logger.info("a newer global version arrived before the round started; training from it",
                        extra={"asked": base_version, "held": view.version})
            base_version = view.version
            shard_versions = view.shard_versions if shard_versions is not None else None
        seq = view.next_seq
        base = model_vector(self.model.x0, global_sum, value_scale)
        try:
            result = self.trainer.train_round(
                self.layout.unflatten(base), self.train.X, self.train.y, round_index=seq,
                data_load_s=self.train.load_seconds if seq == 1 else 0.0,
            )
        except PrivacyBudgetExhausted as exc:
            logger.warning("privacy budget exhausted; no longer contributing", extra={"detail": str(exc)})
            return False
        train_wall = time.perf_counter() - started
        if self.settings.slowdown_factor > 1.0 and not (stop and stop.is_set()):
            # Straggler emulation for experiments: stretch the round as a slower machine would.
            (stop or threading.Event()).wait(train_wall * (self.settings.slowdown_factor - 1.0))
        delta = self.layout.flatten(result.state_dict) - base
        built = build_update(
            delta,
            self.owner.residual(),
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
        record_own_updates(self.store.dir, built.chunks)  # ciphertext digests, for proofs of inclusion
        if self.update_built_hook is not None:
            self.update_built_hook(self, seq, delta, base_version, float(result.n_samples))
        self.owner.record_built(residual=built.residual, pending=encoded, seq=seq, base_version=base_version)
        self.last_timings = {
            **{k: round(v, 4) for k, v in result.timings.items()},
            "encrypt_s": round(built.encrypt_seconds, 4),
            "round_wall_s": round(time.perf_counter() - started, 4),
            "bytes": float(sum(map(len, encoded))),
        }
        logger.info("update ready", extra={"seq": seq, "base_version": base_version, "blocks": len(built.sent_indices), **self.last_timings})
        return True

    def mark_pending_published(self) -> None:
        self.owner.mark_published()


def load_site_data(settings: SiteSettings) -> tuple[LoadedDataset, LoadedDataset]:
    """Train and validation splits at the settings' image size, refused when too much is unreadable.

    A manifest whose path prefix is wrong skips most images one warning at a time; training on
    the few left would spend privacy budget on a biased sample, so the site stops with a summary."""
    modalities = settings.expected_modalities or None
    train = load_dataset(settings.manifest, settings.image_size, settings.train_split, modalities=modalities)
    val = load_dataset(settings.manifest, settings.image_size, settings.val_split, modalities=modalities)
    for name, ds in (("train", train), ("val", val)):
        logger.info("loaded local data", extra={"split": name, "n": len(ds), "skipped": ds.n_skipped,
                                                "seconds": round(ds.load_seconds, 2)})
    n_skipped = train.n_skipped + val.n_skipped
    total = len(train) + len(val) + n_skipped
    if total and n_skipped / total > settings.max_unreadable_fraction:
        raise ConfigError(
            f"{n_skipped} of {total} images listed in {settings.manifest} were skipped "
            f"({n_skipped / total:.0%} > max_unreadable_fraction {settings.max_unreadable_fraction:.0%}): "
            f"{(train.skip_summary() or val.skip_summary())}. Paths are relative to the manifest's folder "
            f"{Path(settings.manifest).resolve().parent}; run `fedmq site check-data --config ...` for the list."
        )
    if len(train) == 0:
        raise ConfigError(f"no readable training images in {settings.manifest}")
    return train, val


def check_ledger_present(settings: SiteSettings, store: SiteStateStore) -> None:
    """A privacy ledger never silently resets: state.json says updates were sent but the ledger is
    gone (the ledger is always written before the state, so this is never a crash: the budget
    already spent would be forgotten).

    The other half (a ledger without state.json) is also what a crash during the very first round
    leaves, so it is not refused here: a site without state.json asks the aggregator whether its
    id already contributed (``join_wait_s``) and refuses to start if so."""
    ledger = store.dir / LEDGER_FILE
    if not store.exists():
        return
    try:
        import json

        sent = int(json.loads(store.path.read_text()).get("updates_sent", 0))
    except (OSError, ValueError):
        return  # the state loader reports an unreadable state.json with its own message
    if settings.dp_enabled and sent > 0 and not ledger.exists():
        raise ConfigError(
            f"privacy ledger {ledger} is missing but {store.path} records {sent} update(s) sent: the budget "
            f"they spent would be forgotten. Restore {LEDGER_FILE} from your backup of {store.dir}; a "
            f"privacy ledger is never reset."
        )


__all__ = ["SiteRuntime", "check_ledger_present", "training_config"]
