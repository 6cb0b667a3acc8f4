"""The study's evaluator: a key holder that follows global versions and scores them.

It plays the role of the consortium's study coordinator, who holds the site key like any
hospital (never the aggregator). It binds its own queue to the fanout exchange, rebuilds
each version exactly as a site does, and evaluates it on held-out data: the official
validation split (checkpoint and threshold selection) and the official test split (reported).

With ``ema_beta`` set it also keeps ema_v = beta ema_{v-1} + (1 - beta) x_v of the versions it
applies (ema of the first one = that version) and scores it the same way (``ema_*`` fields of
:class:`VersionScore`). That is post-processing of released models: no privacy cost, no
change to sites or aggregator. The plain fields always describe the raw x_v.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmq.broker import topology
from fedmq.broker.connection import AuthRefusals, Backoff
from fedmq.broker.transport import Connect, Delivery, Message, amqp_connect, run_reconnecting
from fedmq.experiments.defaults import ema_beta, planned_rounds
from fedmq.experiments.scoring import select_threshold
from fedmq.shared.ckks import LoadedContext
from fedmq.shared.codec import decode_global_version, encode
from fedmq.shared.errors import WireError
from fedmq.shared.schema import SnapshotRequest
from fedmq.shared.signing import VerifyKey
from fedmq.site_agent.global_model import GlobalModelReceiver
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.state import SiteState
from fedmq.site_agent.training import evaluate, predict_proba
from fedmq.site_agent.version_guard import VersionGuard

logger = logging.getLogger(__name__)

EVALUATOR_ID = "evaluator"
#: the EMA rule (experiments.defaults.ema_beta) for a run of the default number of rounds, one
#: version per round; a federation sets its own from the versions it will publish
DEFAULT_EMA_BETA: float | None = ema_beta(planned_rounds())


@dataclass(frozen=True)
class VersionScore:
    version: int
    wall_s: float
    val_auc: float
    test_auc: float
    test_accuracy: float
    threshold: float
    contributors: int
    #: the same scores for the EMA of the versions up to this one (nan when ema_beta is None)
    ema_val_auc: float = math.nan
    ema_test_auc: float = math.nan
    ema_test_accuracy: float = math.nan
    ema_threshold: float = math.nan
    #: who contributed to this version, from its signed message: (site, staleness) per folded update
    members: tuple[tuple[str, int], ...] = ()
    #: seconds (on the same clock as wall_s) at which the aggregator released this version, from
    #: its signed ``created_at``: unlike wall_s it does not grow when scoring falls behind a
    #: fast stream of versions (nan when unknown)
    released_s: float = math.nan


@dataclass
class Evaluator:
    url: str
    ctx: LoadedContext
    model: FederatedModel
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    #: the aggregator's public key and a directory for the evaluator's verified audit chain:
    #: the evaluator checks versions exactly as a site does (site_agent/version_guard.py)
    aggregator_key: VerifyKey
    audit_dir: Path
    started: float = field(default_factory=time.monotonic)
    scores: list[VersionScore] = field(default_factory=list)
    bytes_received: int = 0
    #: EMA coefficient of the key-holder's model average (None = off); see docs/reproduction.md
    ema_beta: float | None = DEFAULT_EMA_BETA
    #: how it reaches the broker (None: ``amqp_connect(url)``; tests may pass a ``StubBroker``'s)
    connect: Connect | None = None

    def __post_init__(self) -> None:
        self.state = SiteState(EVALUATOR_ID, self.ctx.fingerprint, self.model.layout.fingerprint)
        self.receiver = GlobalModelReceiver(self.state, self.ctx, self.model.layout.fingerprint, self.model.layout.size,
                                            guard=VersionGuard(self.aggregator_key, self.audit_dir))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._asked_for: int | None = None
        self._ema: np.ndarray | None = None
        self._connect = self.connect or amqp_connect(self.url, name="fedmq-evaluator")
        # the reconnect loop every service shares (broker/transport.py), with the services' backoff
        self._backoff = Backoff(initial_s=0.5, max_s=5.0)
        self._auth = AuthRefusals()

    def _score_vector(self, vec: np.ndarray) -> tuple[float, float, float, float]:
        """(val AUC, test AUC, test accuracy, threshold chosen on validation)."""
        net = self.model.to_module(vec)
        val_probs = predict_proba(net, self.val[0])
        threshold = select_threshold(labels=self.val[1].numpy(), probs=val_probs)
        val_auc = float(evaluate(net, *self.val)["auc"])
        test = evaluate(net, *self.test, threshold=threshold)
        return val_auc, float(test["auc"]), float(test["accuracy"]), threshold

    def update_ema(self, vec: np.ndarray) -> np.ndarray | None:
        """Fold one applied version into the EMA; returns the EMA model vector (None when off)."""
        if self.ema_beta is None:
            return None
        x = np.asarray(vec, dtype=np.float64)
        self._ema = x.copy() if self._ema is None else self.ema_beta * self._ema + (1.0 - self.ema_beta) * x
        return self._ema.astype(np.asarray(vec).dtype)

    def score(self, version: int, contributors: int, members: tuple[tuple[str, int], ...] = (),
              created_at: float | None = None) -> VersionScore:
        # the aggregator's wall-clock release time, on this evaluator's monotonic clock
        released = math.nan if created_at is None else created_at - (time.time() - (time.monotonic() - self.started))
        vec = self.receiver.model_vector(self.model.x0)
        val_auc, test_auc, test_acc, threshold = self._score_vector(vec)
        ema = self.update_ema(vec)
        extra = {}
        if ema is not None:
            e_val, e_test, e_acc, e_thr = self._score_vector(ema)
            extra = dict(ema_val_auc=e_val, ema_test_auc=e_test, ema_test_accuracy=e_acc, ema_threshold=e_thr)
        return VersionScore(version, time.monotonic() - self.started, val_auc, test_auc, test_acc, threshold,
                            contributors, members=members, released_s=released, **extra)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fedmq-evaluator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def latest(self) -> VersionScore | None:
        with self._lock:
            return self.scores[-1] if self.scores else None

    def all_scores(self) -> list[VersionScore]:
        with self._lock:
            return list(self.scores)

    def _run(self) -> None:
        """The one reconnect loop (``run_reconnecting``); anything but a lost broker ends the
        evaluator and is surfaced to the runner through ``error`` (three 403s in a row too)."""
        try:
            run_reconnecting(self._session, stop=self._stop, backoff=self._backoff, auth=self._auth,
                             what="evaluator")
        except BaseException as exc:  # surfaced to the runner, which stops the run
            self.error = exc
            logger.exception("evaluator failed")

    def _session(self) -> None:
        link = self._connect()
        try:
            spec = topology.site_queue_spec(EVALUATOR_ID)
            link.check_declared((spec,))  # declared by the administrator; sites have no configure right
            self._auth.ok()
            self._backoff.connected()

            def on_message(delivery: Delivery) -> None:
                self.bytes_received += len(delivery.body)
                try:
                    chunk = decode_global_version(delivery.body)
                    result = self.receiver.offer(chunk)
                except WireError as exc:
                    logger.error("evaluator refused a message: %s", exc)
                    delivery.ack()
                    return
                delivery.ack()
                if result.outcome == "applied":
                    s = self.score(result.version, len(chunk.contributors),
                                   tuple((c.site_id, c.staleness) for c in chunk.contributors), chunk.created_at)
                    with self._lock:
                        self.scores.append(s)
                elif result.outcome == "gap" and self._asked_for != result.message_version:
                    self._asked_for = result.message_version
                    req = SnapshotRequest(site_id=EVALUATOR_ID, have_version=self.state.version, reason="gap")
                    link.publish(Message(topology.CONTROL_EXCHANGE, topology.SNAPSHOT_REQUEST_KEY, encode(req),
                                         kind="snapshot-request"))

            link.consume(spec.name, on_message, prefetch=16)
            while not self._stop.is_set():
                link.process(0.5)
        finally:
            link.close()
