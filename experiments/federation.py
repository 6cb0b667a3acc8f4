"""Run a real federation: a RabbitMQ broker, the aggregator and N site agents as OS processes.

Used by ``fedmq demo`` and by the asynchronous-vs-synchronous comparison. Every part is the
production one: processes talk only through the broker, updates are CKKS-encrypted and
signed, sites train with Opacus DP-SGD on images loaded through MONAI from DICOM/PNG/NIfTI.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmq.broker import topology
from fedmq.broker.local_node import LocalRabbitNode
from fedmq.broker.definitions import definitions, write_definitions
from fedmq.broker.provision import AGGREGATOR_USER, plan
from fedmq.broker.transport import connect_link
from fedmq.shared.ckks import init_keys, load_context
from fedmq.shared.errors import FedmqError
from fedmq.shared.signing import generate_aggregator_key, generate_site_key, load_public_key, private_key_path
from fedmq.site_agent.data import load_official_split, prepare_demo_data
from fedmq.site_agent.model_state import FederatedModel
from fedmq.site_agent.models import Preset
from fedmq.site_agent.settings import DEFAULT_TOPK_FRACTION

from fedmq.experiments.evaluator import EVALUATOR_ID, Evaluator, VersionScore

logger = logging.getLogger(__name__)

VHOST = "fedmq"


class SiteTraining(BaseModel):
    """Local-training settings every site uses (the rules in experiments/defaults.py)."""

    model_config = ConfigDict(extra="forbid")
    model_preset: Preset = "small_cnn"  # the one registry: site_agent/models.py
    #: None under DP: the learning-rate rule (experiments.defaults.dp_learning_rate) applied to
    #: the noise multipliers the sites' accountants will compute for their data
    lr: float | None = Field(0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = 0.9
    batch_size: int = 64
    local_epochs: int = 1
    #: steps per round instead of epochs (the site setting ``local_steps``)
    local_steps: int | None = None
    #: rounds of at most this many steps and at most one epoch at each site: each site's
    #: ``local_steps`` from its training-set size (the rule experiments.defaults.local_steps);
    #: None: ``local_steps`` / ``local_epochs`` as set, the same for every site
    most_local_steps: int | None = Field(None, ge=1)
    max_grad_norm: float = 1.0
    #: K views per image per step (the site setting ``augmentations``; 0: none)
    augmentations: int = Field(0, ge=0, le=64)
    sparsity_mode: Literal["dense", "topk"] = "topk"
    topk_fraction: float = DEFAULT_TOPK_FRACTION


#: (argv, env, log file) -> a process driven like ``subprocess.Popen`` (poll, wait, send_signal,
#: terminate, kill, pid, returncode)
Spawner = Callable[[Sequence[str], Mapping[str, str], IO[bytes]], Any]


class FederationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    workdir: Path
    data_npz: Path
    n_sites: int = Field(3, ge=1, le=64)
    alpha: float = 0.5
    seed: int = 0
    mode: Literal["async", "sync"] = "async"
    buffer_size: int = Field(2, ge=1)
    server_lr: float = 1.0
    max_staleness: int = 8
    dp_enabled: bool = True
    target_epsilon: float = 1.2
    planned_rounds: int = Field(20, ge=1)
    training: SiteTraining = Field(default_factory=SiteTraining)
    slowdown: dict[str, float] = Field(default_factory=dict)
    target_auc: float | None = None
    #: which score must reach target_auc: validation (selection-safe) or test
    target_on: Literal["val", "test"] = "val"
    time_limit_s: float = 780.0
    retrain_after_s: float = 60.0
    #: sites start their next round as soon as an update is published (site setting
    #: ``train_continuously``: FedBuff's clients; async mode only)
    train_continuously: bool = False
    #: the evaluator also scores the EMA of versions (the demo selects on it); off, each version
    #: is scored once, which leaves more of a small machine to the federation itself
    score_ema: bool = True
    max_versions: int | None = None
    amqp_url: str | None = None  # None: start a private broker node
    #: the evaluator's EMA of versions; None: the rule (fedmq.experiments.defaults.ema_beta) for the
    #: number of versions the run will publish
    ema_beta: float | None = Field(None, gt=0, lt=1)

    def resolved_ema_beta(self) -> float:
        from fedmq.experiments.defaults import ema_beta, expected_versions

        if self.ema_beta is not None:
            return self.ema_beta
        k = self.buffer_size if self.mode == "async" else self.n_sites
        return ema_beta(expected_versions(self.planned_rounds, self.n_sites, k))

    @model_validator(mode="after")
    def _continuous_only_async(self) -> "FederationSpec":
        if self.train_continuously and self.mode == "sync":
            raise ValueError("train_continuously is for async mode: sync refuses a second update per round "
                             "(each would spend privacy budget for nothing)")
        return self


@dataclass
class FederationResult:
    scores: list[VersionScore]
    wall_seconds: float
    seconds_to_target: float | None
    bytes_sent_by_site: dict[str, int]
    bytes_broadcast_received: int
    epsilon_by_site: dict[str, float]
    updates_by_site: dict[str, int]
    stop_reason: str
    data_summary: dict
    aggregator_status: dict = field(default_factory=dict)
    #: the audit chain as one hospital holds it, verified offline (``audit_summary``)
    audit: dict = field(default_factory=dict)
    #: what the rules of experiments/defaults.py gave this run: each site's lr and noise
    #: multiplier (as its accountant computes it), and the evaluator's EMA coefficient
    learning_rates: dict[str, float] = field(default_factory=dict)
    noise_multipliers: dict[str, float] = field(default_factory=dict)
    #: each site's steps per round (None: epochs), as its config says
    local_steps: dict[str, int | None] = field(default_factory=dict)
    ema_beta: float | None = None
    #: wall-clock (epoch) time of the moment the processes started: the zero of every ``wall_s``
    started_at: float | None = None

    @property
    def best(self) -> VersionScore | None:
        """The version selected on validation AUC (never on test)."""
        return max(self.scores, key=lambda s: (s.val_auc, s.version)) if self.scores else None

    def selected(self) -> tuple[VersionScore, str, float, float] | None:
        """(score, model, test AUC, test accuracy) of the candidate with the best validation AUC.

        Candidates are every version x_v and, where the evaluator kept one, the EMA of the
        versions up to v (post-processing of released versions: no privacy cost).
        """
        best: tuple[float, int, VersionScore, str, float, float] | None = None
        for s in self.scores:
            for model, val, test, acc in (
                ("version", s.val_auc, s.test_auc, s.test_accuracy),
                ("ema", s.ema_val_auc, s.ema_test_auc, s.ema_test_accuracy),
            ):
                if val == val and (best is None or (val, s.version) > best[:2]):  # skips NaN
                    best = (val, s.version, s, model, test, acc)
        return None if best is None else (best[2], best[3], best[4], best[5])

    def to_json(self) -> dict:
        d = asdict(self)
        d["scores"] = [asdict(s) for s in self.scores]
        return d


def site_ids(n: int) -> list[str]:
    return [f"hospital_{i + 1}" for i in range(n)]


def _toml(values: dict) -> str:
    lines = []
    for k, v in values.items():
        if v is None:  # TOML has no null: an unset setting keeps its default
            continue
        if isinstance(v, bool):
            lines.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{k} = {v!r}")
        else:
            lines.append(f"{k} = {json.dumps(str(v))}")
    return "\n".join(lines) + "\n"


class Federation:
    """Owns every process of one run; ``close`` always tears everything down."""

    def __init__(self, spec: FederationSpec, progress: Callable[[str], None] | None = None, *,
                 spawner: Spawner | None = None) -> None:
        self.spec = spec
        self.progress = progress or (lambda msg: None)
        self.dir = spec.workdir.resolve()
        self.sites = site_ids(spec.n_sites)
        self._stack = ExitStack()
        #: how a process is started: None = a fresh interpreter (``subprocess.Popen``); a test
        #: may inject one that forks from a pre-imported interpreter (tests/testkit/zygote.py)
        self.spawner = spawner
        self.procs: dict[str, Any] = {}
        self.node: LocalRabbitNode | None = None

    # -- set-up ----------------------------------------------------------------------------
    def prepare(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        for sub in ("keys/sites", "config", "state", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.progress("preparing hospitals (DICOM / PNG / NIfTI) from PneumoniaMNIST")
        self.summary = prepare_demo_data(self.spec.data_npz, self.dir / "data", n_sites=self.spec.n_sites, alpha=self.spec.alpha, seed=self.spec.seed)
        self.progress("creating the CKKS key and site signing keys")
        self.keys = init_keys(self.dir / "keys")
        for site in self.sites:
            priv, pub = generate_site_key(self.dir / "keys", site)
            shutil.copy(pub, self.dir / "keys" / "sites" / pub.name)
        # the aggregator's own key: it signs versions, snapshots and audit records
        self.aggregator_key, self.aggregator_pub = generate_aggregator_key(self.dir / "keys")
        self._broker()
        self._write_configs()

    def _broker(self) -> None:
        passwords = {u: secrets.token_urlsafe(16) for u in [AGGREGATOR_USER, EVALUATOR_ID, *self.sites]}
        if self.spec.amqp_url is None:
            self.progress("starting a private RabbitMQ node")
            self.node = self._stack.enter_context(LocalRabbitNode())
            # One import of a definitions document (users, least-privilege permissions, the
            # whole topology) instead of dozens of rabbitmqctl round trips.
            grants = plan([*self.sites, EVALUATOR_ID], passwords.__getitem__)
            doc = definitions(VHOST, grants, sites=[*self.sites, EVALUATOR_ID])
            doc["permissions"].append({"user": self.node.username, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"})
            # The node reads the file as the rabbitmq user, who may not reach the work directory
            # (pytest's tmp_path is 0700 under root): hand it over in a readable temp folder.
            handover = Path(tempfile.mkdtemp(prefix="fedmq-defs-"))
            self._stack.callback(shutil.rmtree, handover, ignore_errors=True)
            handover.chmod(0o755)
            defs = handover / "definitions.json"
            write_definitions(defs, doc)
            defs.chmod(0o644)
            self.node.rabbitmqctl("import_definitions", str(defs))
            self.urls = {user: self.node.url_for_vhost(VHOST, username=user, password=pw) for user, pw in passwords.items()}
            admin_url = self.node.url_for_vhost(VHOST)
            self.check_user_id = True
        else:
            # An external broker: everyone uses the given credentials, so the broker cannot
            # vouch for each site's identity; signatures still authenticate every update.
            admin_url = self.spec.amqp_url
            self.urls = {u: self.spec.amqp_url for u in passwords}
            self.check_user_id = False
        link = connect_link(admin_url, attempts=1, name="fedmq-federation-admin")
        try:
            link.declare(topology.EXCHANGES, (*topology.aggregator_queue_specs(),
                                              *(topology.site_queue_spec(s) for s in [*self.sites, EVALUATOR_ID])))
        finally:
            link.close()

    def site_local_steps(self) -> dict[str, int | None]:
        """Each site's ``local_steps``: the rule of experiments/defaults.py for its training-set
        size when ``most_local_steps`` is set, else the configured value (None: epochs)."""
        from fedmq.experiments.defaults import local_steps

        t = self.spec.training
        if t.most_local_steps is None:
            return {site: t.local_steps for site in self.sites}
        return {site: local_steps(sum(v["train"].values()), batch_size=t.batch_size, most=t.most_local_steps)
                for site, v in self.summary["sites"].items()}

    def site_learning_rates(self) -> dict[str, float]:
        """Each site's lr: the configured one, or under DP (lr None) the rule of
        experiments/defaults.py applied to the noise multipliers the sites will compute."""
        from fedmq.experiments.defaults import dp_noise_multiplier, federation_learning_rate

        s, t = self.spec, self.spec.training
        if t.lr is not None:
            return {site: t.lr for site in self.sites}
        if not s.dp_enabled:
            raise ValueError("lr None means the DP learning-rate rule; set lr when DP is off")
        train_counts = {site: sum(v["train"].values()) for site, v in self.summary["sites"].items()}
        steps = self.site_local_steps()
        sigmas = {site: dp_noise_multiplier(n, batch_size=t.batch_size, rounds=s.planned_rounds, epsilon=s.target_epsilon,
                                            local_epochs=t.local_epochs, local_steps=steps[site])
                  for site, n in train_counts.items()}
        self.noise_multipliers = sigmas
        # rounds of at most S steps: the lr rule's momentum correction for S (experiments/defaults.py)
        return federation_learning_rate(sigmas, batch_size=t.batch_size, max_grad_norm=t.max_grad_norm,
                                        round_steps=t.most_local_steps, momentum=t.momentum)

    def _write_configs(self) -> None:
        s, t = self.spec, self.spec.training
        train_counts = [sum(v["train"].values()) for v in self.summary["sites"].values()]
        reference = sum(train_counts) / len(train_counts)
        self.learning_rates = self.site_learning_rates()
        self.local_steps = self.site_local_steps()
        agg = {
            "amqp_url": self.urls[AGGREGATOR_USER],
            "public_context": self.keys.public_context,
            "site_keys_dir": self.dir / "keys" / "sites",
            "signing_key": self.aggregator_key,
            "state_dir": self.dir / "state" / "aggregator",
            "mode": s.mode,
            "buffer_size": s.buffer_size if s.mode == "async" else s.n_sites,
            "server_lr": s.server_lr,
            "max_staleness": s.max_staleness,
            "reference_sample_weight": reference,
            "check_user_id": self.check_user_id,
            "log_json": True,
        }
        (self.dir / "config" / "aggregator.toml").write_text(_toml(agg))
        for site in self.sites:
            cfg = {
                "amqp_url": self.urls[site],
                "site_id": site,
                "secret_context": self.keys.secret_context,
                "signing_key": private_key_path(self.dir / "keys", site),
                "aggregator_public_key": self.aggregator_pub,
                "manifest": self.dir / "data" / site / "manifest.csv",
                "state_dir": self.dir / "state" / site,
                "dp_enabled": s.dp_enabled,
                "target_epsilon": s.target_epsilon,
                "planned_rounds": s.planned_rounds,
                "seed": s.seed,
                "slowdown_factor": float(s.slowdown.get(site, 1.0)),
                "retrain_after_s": s.retrain_after_s,
                "train_continuously": s.train_continuously,
                "progress_bars": False,
                "log_json": True,
                **t.model_dump(exclude={"most_local_steps"}),
                "local_steps": self.local_steps[site],
                "lr": self.learning_rates[site],
            }
            (self.dir / "config" / f"{site}.toml").write_text(_toml(cfg))

    def command(self, name: str, args: list[str], env: dict[str, str]) -> list[str]:
        """The argv that starts process ``name`` running ``fedmq <args>``. A driver that needs
        something else around the product (the fault driver's test launcher) overrides this;
        ``env`` may be changed in place."""
        return [sys.executable, "-m", "fedmq.shared.cli", *args]

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        self._stack.callback(log.close)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        argv = self.command(name, args, env)
        if self.spawner is not None:
            self.procs[name] = self.spawner(argv, env, log)
            return
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    # -- run -------------------------------------------------------------------------------
    def start(self, sites: Sequence[str] | None = None) -> Evaluator:
        """Start the evaluator, the aggregator and the site agents (every site, or ``sites``: the
        others are provisioned and pinned but join later through ``spawn_site``)."""
        s = self.spec
        ctx = load_context(self.keys.secret_context, require_secret=True)
        model = FederatedModel.create(s.training.model_preset, 0)
        val = load_official_split(s.data_npz, "val")
        test = load_official_split(s.data_npz, "test")
        self.evaluator = Evaluator(self.urls[EVALUATOR_ID], ctx, model, _tensors(val), _tensors(test),
                                   load_public_key(self.aggregator_pub), self.dir / "state" / EVALUATOR_ID,
                                   ema_beta=s.resolved_ema_beta() if s.score_ema else None)
        self.evaluator.start()
        self._stack.callback(self.evaluator.stop)
        joining = list(self.sites if sites is None else sites)
        self.progress(f"starting the aggregator ({s.mode}) and {len(joining)} site agents as separate processes")
        self.spawn_aggregator()
        for site in joining:
            self.spawn_site(site)
        self.started = time.monotonic()
        self.started_at = time.time()
        self.evaluator.started = self.started
        return self.evaluator

    def spawn_aggregator(self) -> None:
        self._spawn("aggregator", ["aggregator", "run", "--config", str(self.dir / "config" / "aggregator.toml")])

    def spawn_site(self, site: str) -> None:
        self._spawn(site, ["site", "run", "--config", str(self.dir / "config" / f"{site}.toml")])

    def run(self) -> FederationResult:
        s = self.spec
        evaluator = self.start()
        started = self.started
        reached: float | None = None
        reason = "time limit"
        last_reported = -1
        while True:
            time.sleep(1.0)
            elapsed = time.monotonic() - started
            if evaluator.error is not None:
                raise RuntimeError(f"evaluator failed: {evaluator.error!r}")
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"process(es) exited early: {dead}; see {self.dir / 'logs'}")
            latest = evaluator.latest()
            if latest is not None and latest.version != last_reported:
                last_reported = latest.version
                self.progress(
                    f"[{elapsed:6.1f}s] version {latest.version:3d}: test AUC {latest.test_auc:.3f}, "
                    f"val AUC {latest.val_auc:.3f}, {latest.contributors} update(s) folded"
                )
                score = latest.val_auc if s.target_on == "val" else latest.test_auc
                if s.target_auc is not None and reached is None and score >= s.target_auc:
                    reached = latest.wall_s
                    reason = f"target AUC {s.target_auc} reached"
                    break
            if s.max_versions is not None and latest is not None and latest.version >= s.max_versions:
                reason = f"{s.max_versions} versions"
                break
            if elapsed >= s.time_limit_s:
                break
            if self._all_sites_done() and elapsed > 5 and self._quiet_for(evaluator, 20.0):
                reason = "every site finished its planned rounds"
                break
        wall = time.monotonic() - started
        self.progress(f"stopping ({reason})")
        self.terminate()
        evaluator.stop()
        return self._collect(evaluator, wall, reached, reason)

    def _all_sites_done(self) -> bool:
        for site in self.sites:
            state = self.dir / "state" / site / "state.json"
            try:
                if json.loads(state.read_text())["updates_sent"] < self.spec.planned_rounds:
                    return False
            except (OSError, ValueError, KeyError):
                return False
        return True

    @staticmethod
    def _quiet_for(evaluator: Evaluator, seconds: float) -> bool:
        latest = evaluator.latest()
        return latest is None or time.monotonic() - evaluator.started - latest.wall_s > seconds

    def terminate(self) -> None:
        """SIGTERM every process this federation started, SIGKILL after 60 s."""
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s ignored SIGTERM; killing it", name)
                proc.kill()
                proc.wait()

    def _collect(self, evaluator: Evaluator, wall: float, reached: float | None, reason: str) -> FederationResult:
        from fedmq.site_agent.runtime import LEDGER_FILE
        from fedmq.site_agent.training import PrivacyLedger

        bytes_sent, eps, updates = {}, {}, {}
        for site in self.sites:
            sdir = self.dir / "state" / site
            meta = json.loads((sdir / "state.json").read_text()) if (sdir / "state.json").exists() else {}
            bytes_sent[site] = int(meta.get("bytes_sent", 0))
            updates[site] = int(meta.get("updates_sent", 0))
            ledger = sdir / LEDGER_FILE
            eps[site] = float(PrivacyLedger.load(ledger).epsilon_spent()) if ledger.exists() else 0.0
        status_path = self.dir / "state" / "aggregator" / "status.json"
        status = json.loads(status_path.read_text()) if status_path.exists() else {}
        return FederationResult(
            scores=evaluator.all_scores(),
            wall_seconds=wall,
            seconds_to_target=reached,
            bytes_sent_by_site=bytes_sent,
            bytes_broadcast_received=evaluator.bytes_received,
            epsilon_by_site=eps,
            updates_by_site=updates,
            stop_reason=reason,
            data_summary=self.summary,
            aggregator_status=status,
            audit=self.audit_summary(self.sites[0]),
            learning_rates=dict(getattr(self, "learning_rates", {})),
            noise_multipliers=dict(getattr(self, "noise_multipliers", {})),
            local_steps=dict(getattr(self, "local_steps", {})),
            ema_beta=evaluator.ema_beta,
            started_at=getattr(self, "started_at", None),
        )

    def audit_summary(self, site: str) -> dict:
        """Verify the audit chain ``site`` kept, as ``fedmq audit verify`` does: versions covered,
        head hash, seconds, and the per-site tables (markdown) for the report."""
        from fedmq.shared.audit import chain_file, load_chain
        from fedmq.shared.audit_cli import tables

        path = chain_file(self.dir / "state" / site)
        if not path.exists():
            return {"site": site, "ok": False, "error": f"no audit chain at {path}"}
        t = time.perf_counter()
        try:
            chain = load_chain(path, load_public_key(self.aggregator_pub), anchor_ok=True)
        except FedmqError as exc:
            return {"site": site, "ok": False, "error": str(exc)}
        return {"site": site, "ok": True, "versions": [chain.base + 1, chain.head], "head_hash": chain.head_hash,
                "verify_seconds": round(time.perf_counter() - t, 4),
                "tables_markdown": tables(chain.records, markdown=True)}

    def close(self) -> None:
        self.terminate()
        self._stack.close()

    def __enter__(self) -> "Federation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensors(split: tuple) -> tuple:
    import torch

    X, y = split
    return torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32).reshape(-1)


def run_federation(spec: FederationSpec, progress: Callable[[str], None] | None = None) -> FederationResult:
    with Federation(spec, progress) as fed:
        fed.prepare()
        return fed.run()
