"""In-process federation: the shipped site and aggregator code, minus the broker.

Sites are :class:`site_agent.training.LocalTrainer` instances with their own privacy
ledgers, trained on a Dirichlet(alpha) label-skewed split of a MedMNIST train split. Each
update is ``trained - base`` plus the error-feedback residual, sparsified, CKKS-encrypted,
chunked and signed by :func:`site_agent.update_builder.build_update` and encoded with the
wire codec. The aggregator is the shipped :class:`aggregator.engine.AggregatorEngine`
(public context, pinned site keys, its own signing key), driven in-process by
:class:`EngineDriver`: ``accept`` then ``apply`` per chunk, as the broker consumer does. Its
signed version messages go to a :class:`site_agent.global_model.GlobalModelReceiver`, which
decrypts and applies them exactly as a site does. No rule of aggregation lives here.

Time is a discrete-event clock, the only thing this module adds: a site's round lasts its
measured compute time (training + encryption) times its slowdown factor, or its optimizer
steps times a fixed step time (``clock="steps"``); broker latency and aggregator time are
not modelled. In sync mode every site trains from the current version and the round lasts as
long as its slowest site; in async mode each site trains again from the newest version as
soon as its update is in.

Evaluation: every committed version is scored on the union of the sites' local validation
splits (used for checkpoint selection and for the accuracy threshold) and on the official
test split (reported only, never used to select anything).
"""

from __future__ import annotations

import heapq
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedmq.shared.ckks import DEFAULT_PRESET as DEFAULT_CKKS_PRESET
from fedmq.experiments.scoring import accuracy_at, auc_of, select_threshold
from fedmq.site_agent.data.demo_data import dirichlet_partition, load_npz_split, load_official_split
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.models import Preset
from fedmq.site_agent.runtime import training_seed
from fedmq.site_agent.settings import DEFAULT_TOPK_FRACTION
from fedmq.site_agent.training import DPConfig, LocalTrainer, TrainingConfig, predict_proba

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- settings


class LocalSettings(BaseModel):
    """What each site (or the centralized trainer) does in one round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(2e-3, gt=0)
    optimizer: Literal["sgd", "adam"] = "adam"
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=1)
    local_epochs: int = Field(1, ge=1)
    #: optimizer steps per round instead of local_epochs (the site setting ``local_steps``)
    local_steps: int | None = Field(None, ge=1)
    dp: bool = False
    target_epsilon: float = Field(1.2, gt=0)
    #: None = 1/(10 n), the site agent's default (always <= 1/n)
    target_delta: float | None = None
    max_grad_norm: float = Field(1.0, gt=0)
    #: K views of every example per step, gradients averaged before clipping (the site setting
    #: ``augmentations``; 0: none)
    augmentations: int = Field(0, ge=0, le=64)


class FederationSettings(BaseModel):
    """Aggregator-side and topology settings of one simulated federation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Preset = "small_cnn"
    init_seed: int = 0
    n_sites: int = Field(3, ge=1)
    alpha: float = Field(0.5, gt=0)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    mode: Literal["async", "sync"] = "sync"
    #: K for async; sync always commits after every site folded once
    buffer_size: int = Field(2, ge=1)
    server_lr: float = Field(1.0, gt=0)
    staleness_exponent: float = Field(0.5, ge=0)
    max_staleness: int = Field(16, ge=0)
    weight_quantum: int = Field(64, ge=1)
    #: updates each site contributes (= DP planned_rounds)
    rounds: int = Field(10, ge=1)
    sparsity_mode: Literal["dense", "topk"] = "topk"
    topk_fraction: float = Field(DEFAULT_TOPK_FRACTION, gt=0, le=1)
    ckks_preset: str = DEFAULT_CKKS_PRESET
    #: per-site slowdown factors (missing entries = 1.0)
    slowdowns: tuple[float, ...] = ()
    #: stop as soon as the validation AUC reaches this (time-to-target runs); None = run all rounds
    stop_at_val_auc: float | None = None
    #: the event clock: "measured" = each round's measured compute seconds x slowdown;
    #: "steps" = optimizer steps x ``seconds_per_step`` x slowdown (immune to a busy shared CPU)
    clock: Literal["measured", "steps"] = "measured"
    seconds_per_step: float = Field(0.05, gt=0)
    #: key-holder post-processing: ema_v = beta ema_{v-1} + (1 - beta) x_v over released versions
    #: (ema_1 = x_1); each version's x_v and ema_v are both scored and both are selection
    #: candidates on validation. No privacy cost (post-processing of released models). None = off.
    ema_beta: float | None = Field(None, ge=0, lt=1)


# ----------------------------------------------------------------------------- data


@dataclass
class SiteData:
    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class FederationData:
    sites: list[SiteData]
    X_val: torch.Tensor
    y_val: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    dataset: str

    @property
    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([s.X_train for s in self.sites]), torch.cat([s.y_train for s in self.sites])


class UnsupportedDataset(ValueError):
    """The npz is not a binary 2D grayscale MedMNIST dataset."""


@lru_cache(maxsize=4)
def _load_split_cached(npz_path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_official_split(npz_path, split)  # type: ignore[arg-type]


def check_binary(npz_path: Path | str) -> None:
    """small_cnn has one logit: multi-class MedMNIST sets are refused, not silently binarized."""
    _, labels = load_npz_split(npz_path, "train")
    classes = np.unique(labels)
    if len(classes) != 2:
        raise UnsupportedDataset(
            f"{Path(npz_path).name} has {len(classes)} classes; the reproduction (like the reference "
            "study) is binary: use a binary MedMNIST 2D dataset such as pneumoniamnist or breastmnist"
        )


def _stratified_val(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of validation members, stratified so both classes appear."""
    mask = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = min(max(int(round(len(members) * fraction)), 1), max(len(members) - 1, 0))
        mask[members[:n_val]] = True
    return mask


def load_federation_data(
    npz_path: Path | str, *, n_sites: int, alpha: float, val_fraction: float, seed: int
) -> FederationData:
    """Dirichlet(alpha) split of the official train split, a stratified local val split per site."""
    check_binary(npz_path)
    X, y = _load_split_cached(str(npz_path), "train")
    X_test, y_test = _load_split_cached(str(npz_path), "test")
    labels = y.numpy().astype(np.int64)
    parts = dirichlet_partition(labels, n_sites, alpha, seed)
    rng = np.random.default_rng(seed + 7)
    sites = []
    for i, idx in enumerate(parts):
        val = _stratified_val(labels[idx], val_fraction, rng)
        tr, va = torch.from_numpy(idx[~val]), torch.from_numpy(idx[val])
        sites.append(SiteData(f"hospital-{chr(ord('a') + i)}", X[tr], y[tr], X[va], y[va]))
    return FederationData(
        sites=sites,
        X_val=torch.cat([s.X_val for s in sites]),
        y_val=torch.cat([s.y_val for s in sites]),
        X_test=X_test,
        y_test=y_test,
        dataset=Path(npz_path).stem,
    )


# ----------------------------------------------------------------------------- metrics


@dataclass
class EvalPoint:
    version: int
    sim_seconds: float
    wall_seconds: float
    updates_folded: int
    val_auc: float
    test_auc: float
    #: the EMA of the versions up to this one (nan when EMA is off or for x_0)
    ema_val_auc: float = math.nan
    ema_test_auc: float = math.nan


@dataclass
class RunResult:
    """One arm, one seed."""

    arm: str
    history: list[EvalPoint]
    best_version: int
    val_auc: float
    test_auc: float
    threshold: float
    test_accuracy: float
    test_probs: np.ndarray
    wall_seconds: float
    sim_seconds: float
    bytes_up: int = 0
    bytes_down: int = 0
    optimizer_steps: int = 0
    updates: int = 0
    epsilon_spent: list[float] = field(default_factory=list)
    noise_multiplier: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    bytes_estimated: bool = False
    #: which candidate the validation selection picked: "raw" (x_v) or "ema" (ema_v)
    selected_model: str = "raw"
    ema_beta: float | None = None
    #: the local learning rate the sites (or the centralized trainer) used
    lr: float | None = None
    #: per committed version: who contributed (site, update, base version, staleness, weight units)
    versions: list[dict] = field(default_factory=list)
    #: updates' chunks the engine refused, by reason (e.g. too-stale)
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_sent(self) -> int:
        return self.bytes_up + self.bytes_down

    def seconds_to_val_auc(self, target: float) -> float | None:
        for p in self.history:
            if p.val_auc >= target:
                return p.sim_seconds
        return None

    def summary(self) -> dict:
        return {
            "arm": self.arm, "best_version": self.best_version, "val_auc": self.val_auc, "test_auc": self.test_auc,
            "threshold": self.threshold, "test_accuracy": self.test_accuracy, "wall_seconds": self.wall_seconds,
            "sim_seconds": self.sim_seconds, "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "bytes_sent": self.bytes_sent, "bytes_estimated": self.bytes_estimated,
            "optimizer_steps": self.optimizer_steps, "updates": self.updates, "epsilon_spent": self.epsilon_spent,
            "noise_multiplier": self.noise_multiplier, "timings": self.timings,
            "selected_model": self.selected_model, "ema_beta": self.ema_beta, "lr": self.lr,
            "versions": self.versions, "refused": self.refused,
            "history": [vars(p) for p in self.history],
        }


class _Tracker:
    """Scores versions on val + test and remembers the best by validation AUC.

    With ``ema_beta`` set it also keeps ema_v = beta ema_{v-1} + (1 - beta) x_v of the
    selectable versions (ema_1 = x_1), scores it, and lets it compete in the selection.
    """

    def __init__(self, data: FederationData, fm: FederatedModel, t_start: float,
                 ema_beta: float | None = None) -> None:
        self.data, self.fm, self.t_start, self.ema_beta = data, fm, t_start, ema_beta
        self.history: list[EvalPoint] = []
        #: (val_auc, version, val probs, test probs, "raw" | "ema", test AUC)
        self.best: tuple[float, int, np.ndarray, np.ndarray, str, float] | None = None
        self.ema: np.ndarray | None = None

    def _eval(self, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
        model = self.fm.to_module(vector)
        pv = predict_proba(model, self.data.X_val).astype(np.float64)
        pt = predict_proba(model, self.data.X_test).astype(np.float64)
        return pv, pt, auc_of(self.data.y_val.numpy(), pv), auc_of(self.data.y_test.numpy(), pt)

    def _offer(self, val_auc: float, version: int, pv: np.ndarray, pt: np.ndarray, kind: str, test_auc: float) -> None:
        if self.best is None or (not math.isnan(val_auc) and val_auc > self.best[0]):
            self.best = (val_auc, version, pv, pt, kind, test_auc)

    def score(self, vector: np.ndarray, version: int, sim_seconds: float, folded: int, *, selectable: bool = True) -> float:
        pv, pt, val_auc, test_auc = self._eval(vector)
        point = EvalPoint(version, sim_seconds, time.perf_counter() - self.t_start, folded, val_auc, test_auc)
        if selectable:
            self._offer(val_auc, version, pv, pt, "raw", test_auc)
            if self.ema_beta is not None:
                x = np.asarray(vector, dtype=np.float64)
                self.ema = x.copy() if self.ema is None else self.ema_beta * self.ema + (1.0 - self.ema_beta) * x
                epv, ept, point.ema_val_auc, point.ema_test_auc = self._eval(self.ema.astype(np.asarray(vector).dtype))
                self._offer(point.ema_val_auc, version, epv, ept, "ema", point.ema_test_auc)
        self.history.append(point)
        return val_auc

    def finish(self, arm: str, **kw) -> RunResult:
        assert self.best is not None
        val_auc, version, pv, pt, kind, test_auc = self.best
        thr = select_threshold(labels=self.data.y_val.numpy(), probs=pv)
        y_test = self.data.y_test.numpy()
        return RunResult(
            arm=arm, history=self.history, best_version=version, val_auc=val_auc, test_auc=test_auc,
            threshold=thr, test_accuracy=accuracy_at(labels=y_test, probs=pt, threshold=thr), test_probs=pt,
            wall_seconds=time.perf_counter() - self.t_start, selected_model=kind, ema_beta=self.ema_beta, **kw,
        )


def training_config(local: LocalSettings, *, preset: str, seed: int, planned_rounds: int,
                    local_steps: int | None = None) -> TrainingConfig:
    """``local_steps`` (the centralized arm's matched compute) overrides ``local.local_steps``."""
    if local_steps is None:
        local_steps = local.local_steps
    return TrainingConfig(
        model=preset, lr=local.lr, batch_size=local.batch_size, local_epochs=local.local_epochs,
        local_steps=local_steps, optimizer=local.optimizer, momentum=local.momentum,
        weight_decay=local.weight_decay, augmentations=local.augmentations,
        dp=DPConfig(enabled=local.dp, target_epsilon=local.target_epsilon, delta=local.target_delta,
                    max_grad_norm=local.max_grad_norm, planned_rounds=planned_rounds),
        seed=seed,
    )


# ----------------------------------------------------------------------------- centralized


def run_centralized(
    data: FederationData, local: LocalSettings, fed: FederationSettings, *, seed: int, arm: str = "centralized",
    ledger_dir: Path | None = None,
) -> RunResult:
    """One trainer on the pooled site training data, with the FL arms' total optimizer steps.

    Each "round" runs as many steps as all sites together run in one FL round, so
    ``fed.rounds`` rounds match the FL arms' compute; the model is scored after each.
    """
    X, y = data.pooled_train
    per_round = sum(local.local_steps or local.local_epochs * max(1, math.ceil(len(s.X_train) / local.batch_size))
                    for s in data.sites)
    cfg = training_config(local, preset=fed.preset, seed=training_seed("central", seed),
                          planned_rounds=fed.rounds, local_steps=per_round)
    fm = FederatedModel.create(fed.preset, fed.init_seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = LocalTrainer(cfg, (ledger_dir or Path(tmp)) / f"{arm}-ledger.json")
        tracker = _Tracker(data, fm, time.perf_counter(), fed.ema_beta)
        state = fm.layout.unflatten(fm.x0)
        sim = 0.0
        eps: list[float] = []
        sigma = None
        steps = 0
        for r in range(fed.rounds):
            res = trainer.train_round(state, X, y, round_index=r + 1)
            state = res.state_dict
            sim += res.timings.get("total_s", 0.0)
            steps += res.steps
            if res.epsilon is not None:
                eps, sigma = [res.epsilon], res.noise_multiplier
            tracker.score(fm.layout.flatten(state), r + 1, sim, r + 1)
        # centralizing means moving the images: raw uint8 pixels + one label byte each
        raw_bytes = int(len(X) * (X[0].numel() + 1))
        return tracker.finish(arm, sim_seconds=sim, bytes_up=raw_bytes, optimizer_steps=steps, updates=fed.rounds,
                              epsilon_spent=eps, noise_multiplier=sigma, bytes_estimated=True)


# ----------------------------------------------------------------------------- federation


class _Crypto:
    """Keys for one simulated federation: sites hold the secret context, the aggregator the
    public one and its own signing key; site keys are pinned at the aggregator."""

    def __init__(self, preset: str, tmp: Path, site_names: Sequence[str]) -> None:
        from fedmq.shared.ckks import init_keys, load_context
        from fedmq.shared.signing import new_signing_key

        files = init_keys(tmp / "keys", preset)
        self.secret = load_context(files.secret_context, require_secret=True)
        self.public = load_context(files.public_context, require_secret=False)
        self.signing = {n: new_signing_key() for n in site_names}
        self.pinned = {n: k.public_key() for n, k in self.signing.items()}
        self.aggregator = new_signing_key()


def ciphertext_bytes_per_block(preset: str) -> int:
    """Wire size of one fresh (site-made) ciphertext block of the preset."""
    from fedmq.shared.ckks import get_preset

    return get_preset(preset).seeded_bytes


@dataclass
class VersionRecord:
    """Who contributed to one committed version (from the engine's signed version message)."""

    version: int
    sim_seconds: float
    contributors: list[dict]


class EngineDriver:
    """The shipped :class:`fedmq.aggregator.engine.AggregatorEngine`, driven in-process, and one key holder.

    Every rule of aggregation (K, the sync round, staleness weights and refusal, the reference
    weight, value scale, the version message) is the engine's: this class only hands it the
    encoded, signed update chunks (``accept`` then ``apply``, as the broker consumer does, with
    the site as the authenticated user) and feeds the signed version messages it publishes to a
    :class:`site_agent.global_model.GlobalModelReceiver`, the code every site runs to decrypt
    and apply versions. ``vector()`` is then x_v exactly as a site holds it.
    """

    def __init__(self, fed: FederationSettings, fm: FederatedModel, crypto: _Crypto, state_dir: Path,
                 reference_sample_weight: float, n_receivers: int) -> None:
        from fedmq.aggregator.engine import AggregatorEngine
        from fedmq.aggregator.settings import AggregatorSettings
        from fedmq.site_agent.global_model import GlobalModelReceiver
        from fedmq.site_agent.state import SiteState
        from fedmq.site_agent.version_guard import VersionGuard

        settings = AggregatorSettings(
            state_dir=state_dir / "aggregator", mode=fed.mode, buffer_size=fed.buffer_size, server_lr=fed.server_lr,
            staleness_exponent=fed.staleness_exponent, max_staleness=fed.max_staleness,
            weight_quantum=fed.weight_quantum, reference_sample_weight=reference_sample_weight,
            snapshot_every=0, layout_fingerprint=fm.layout.fingerprint, log_json=False,
        )
        self.engine = AggregatorEngine(settings, context=crypto.public, pinned=dict(crypto.pinned),
                                       signing_key=crypto.aggregator)
        self.fm, self.n_receivers = fm, n_receivers
        self.engine.drain_startup()  # the start-up snapshot of x_0: every party already holds it
        holder = SiteState(site_id="key-holder", key_fingerprint=crypto.secret.fingerprint,
                           layout_fingerprint=fm.layout.fingerprint)
        self.receiver = GlobalModelReceiver(
            holder, crypto.secret, fm.layout.fingerprint, fm.x0.size,
            guard=VersionGuard(crypto.aggregator.public_key(), state_dir / "key-holder"),
        )
        self.bytes_down = 0
        self.refused: dict[str, int] = {}
        self.versions: list[VersionRecord] = []
        self.timings = {"fold_s": 0.0, "decrypt_s": 0.0}

    @property
    def version(self) -> int:
        return self.engine.version

    @property
    def total_folded(self) -> int:
        return self.engine.updates_folded_total

    def submit(self, site_id: str, bodies: Sequence[bytes], sim_seconds: float = 0.0) -> bool:
        """One site's update, chunk by chunk; True when it made the engine commit a version."""
        from fedmq.shared.codec import decode_global_version

        before = self.engine.version
        out = []
        t = time.perf_counter()
        for body in bodies:
            decision = self.engine.accept(body, user_id=site_id)
            if decision.action == "reject":
                self.refused[decision.reason] = self.refused.get(decision.reason, 0) + 1
                continue
            out += self.engine.apply(decision)
        self.timings["fold_s"] += time.perf_counter() - t
        t = time.perf_counter()
        for msg in out:
            if msg.kind not in ("delta", "snapshot"):
                continue  # dead letters and notices to one site carry no model
            body = msg.body
            self.bytes_down += self.n_receivers * len(body)
            chunk = decode_global_version(body, max_bytes=len(body) + 1)
            result = self.receiver.offer(chunk)
            if result.outcome == "applied":
                self.versions.append(VersionRecord(chunk.version, sim_seconds,
                                                   [c.model_dump() for c in chunk.contributors]))
        self.timings["decrypt_s"] += time.perf_counter() - t
        return self.engine.version > before

    def vector(self) -> np.ndarray:
        """x_v as every site reconstructs it from the versions applied so far."""
        if self.receiver.owner.view().version == 0:
            return self.fm.x0.copy()
        return self.receiver.model_vector(self.fm.x0)[: self.fm.x0.size].astype(self.fm.x0.dtype)

    def close(self) -> None:
        self.engine.close()


class _Site:
    def __init__(self, data: SiteData, cfg: TrainingConfig, ledger: Path, slowdown: float) -> None:
        self.data, self.cfg, self.slowdown = data, cfg, slowdown
        self.trainer = LocalTrainer(cfg, ledger)
        self.residual: np.ndarray | None = None
        self.seq = 0
        self.epsilon: float | None = None
        self.sigma: float | None = None


def run_federation_sim(
    data: FederationData, local: LocalSettings, fed: FederationSettings, *, seed: int, arm: str = "fl",
    on_engine: Callable[[EngineDriver], None] | None = None,
    local_steps_by_site: dict[str, int] | None = None,
) -> RunResult:
    """Run the federation; returns the best-on-validation version's scores and the whole curve.

    The sites are the shipped trainer and update builder; the aggregator is the shipped engine
    (:class:`EngineDriver`). This function is only the discrete-event clock around them: it
    decides when each site's update arrives, never what the aggregator does with it.
    ``on_engine`` (tests) sees the driver before its temporary state is removed;
    ``local_steps_by_site`` sets a site's steps per round (the site setting ``local_steps``) by name.
    """
    from fedmq.shared.codec import DEFAULT_MAX_MESSAGE_BYTES, encode_update_chunk
    from fedmq.site_agent.update_builder import UpdateIdentity, build_update

    fm = FederatedModel.create(fed.preset, fed.init_seed)
    n = len(data.sites)
    # the aggregator's reference weight, as experiments/federation.py configures the real one
    w_ref = float(np.mean([len(s.X_train) for s in data.sites]))
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        crypto = _Crypto(fed.ckks_preset, tmp, [s.name for s in data.sites])
        agg = EngineDriver(fed, fm, crypto, tmp, w_ref, n_receivers=n)
        sites = [
            _Site(sd, training_config(local, preset=fed.preset, seed=training_seed(sd.name, seed),
                                      planned_rounds=fed.rounds,
                                      local_steps=(local_steps_by_site or {}).get(sd.name)),
                  tmp / f"{sd.name}-ledger.json", fed.slowdowns[i] if i < len(fed.slowdowns) else 1.0)
            for i, sd in enumerate(data.sites)
        ]
        timings = {"train_s": 0.0, "encrypt_s": 0.0, "build_s": 0.0}
        bytes_up = 0
        steps = 0
        tracker = _Tracker(data, fm, time.perf_counter(), fed.ema_beta)
        tracker.score(fm.x0.copy(), 0, 0.0, 0, selectable=False)  # x_0 is on the curve, never selected
        current = fm.x0.copy()

        def train(site: _Site, base: np.ndarray, base_version: int) -> tuple[float, list[bytes]]:
            """One local round + update building; returns (compute seconds, encoded signed chunks)."""
            nonlocal bytes_up, steps
            site.seq += 1
            res = site.trainer.train_round(fm.layout.unflatten(base), site.data.X_train, site.data.y_train,
                                           round_index=site.seq)
            steps += res.steps
            site.epsilon, site.sigma = res.epsilon, res.noise_multiplier
            delta = fm.layout.flatten(res.state_dict) - base
            t = time.perf_counter()
            built = build_update(
                delta, site.residual, UpdateIdentity(site.data.name, site.seq, base_version, float(res.n_samples)),
                crypto.secret, fm.layout.fingerprint, crypto.signing[site.data.name],
                mode=fed.sparsity_mode, fraction=fed.topk_fraction, max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
            )
            site.residual = built.residual
            payload = [encode_update_chunk(c) for c in built.chunks]
            bytes_up += sum(map(len, payload))
            build_s = time.perf_counter() - t
            timings["train_s"] += res.timings.get("total_s", 0.0)
            timings["encrypt_s"] += built.encrypt_seconds
            timings["build_s"] += build_s
            if fed.clock == "steps":
                compute = res.steps * fed.seconds_per_step * site.slowdown
            else:
                compute = (res.timings.get("total_s", 0.0) + build_s) * site.slowdown
            return compute, payload

        def committed(sim_s: float) -> bool:
            """Score the version the engine just committed; True when the run should stop."""
            nonlocal current
            current = agg.vector()
            val = tracker.score(current, agg.version, sim_s, agg.total_folded)
            return fed.stop_at_val_auc is not None and val >= fed.stop_at_val_auc

        sim = 0.0
        stop = False
        try:
            if fed.mode == "sync":
                # every site trains from the current version; the round ends with the slowest
                while not stop and all(s.seq < fed.rounds for s in sites):
                    results = [(s, *train(s, current, agg.version)) for s in sites]
                    sim += max(r[1] for r in results)
                    made = [agg.submit(s.data.name, payload, sim) for s, _, payload in results]
                    if any(made):
                        stop = committed(sim)
                    else:  # the engine refused part of the round: nothing to wait for in a simulation
                        break
            else:
                events: list[tuple[float, int, int, list[bytes]]] = []  # (finish, tiebreak, site, payload)
                counter = 0
                for i, s in enumerate(sites):
                    c, payload = train(s, current, 0)
                    heapq.heappush(events, (c, counter, i, payload))
                    counter += 1
                while events and not stop:
                    sim, _, i, payload = heapq.heappop(events)
                    site = sites[i]
                    if agg.submit(site.data.name, payload, sim):
                        stop = committed(sim)
                    if site.seq < fed.rounds and not stop:
                        c, payload = train(site, current, agg.version)
                        heapq.heappush(events, (sim + c, counter, i, payload))
                        counter += 1
                # a final partial buffer stays uncommitted, as on the real aggregator
            if on_engine is not None:
                on_engine(agg)
        finally:
            agg.close()
        timings.update(agg.timings)
        eps = [float(s.epsilon) for s in sites if s.epsilon is not None]
        sigma = sites[0].sigma
        result = tracker.finish(arm, sim_seconds=sim, bytes_up=bytes_up, bytes_down=agg.bytes_down,
                                optimizer_steps=steps, updates=agg.total_folded, epsilon_spent=eps,
                                noise_multiplier=sigma, timings=timings)
        result.versions = [vars(v) for v in agg.versions]
        result.refused = dict(agg.refused)
        return result


def bootstrap_auc_ci(
    y: np.ndarray, probs_per_seed: Sequence[np.ndarray], *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """95% interval of the seed-averaged test AUC, resampling test images (same resample for all seeds)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).reshape(-1)
    n = len(y)
    stats = []
    from sklearn.metrics import roc_auc_score

    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if len(np.unique(yb)) < 2:
            continue
        stats.append(float(np.mean([roc_auc_score(yb, p[idx]) for p in probs_per_seed])))
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
