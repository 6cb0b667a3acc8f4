"""Fault injection on a live federation, and fuzzing of the aggregator's input.

``run_live(plan)`` starts a real federation (private RabbitMQ node, the aggregator and three
site agents as OS processes, DP on, multi-chunk updates) and, while it trains, injects:

- SIGKILL of the aggregator at random moments (restarted at once each time),
- a restart of the broker node,
- ``rabbitmqctl close_connection`` of every site's and the aggregator's connection,
- a site killed between the chunks of one update (a crash hook, see below).

Afterwards it proves exactly-once from the outside: the sites record the plaintext of every
update they build (a recording hook); the aggregator's durable state
(checkpoint + WAL replayed offline) says which update ids were counted; the committed model is
decrypted with the sites' secret key and compared with a plaintext replay over the counted
ids. ``fuzz_engine`` and ``fuzz_amqp`` throw random, mutated, truncated and oversized input at
the aggregator. ``run_all`` does everything and writes ``reports/faults/results.json``.

Test hooks are injected, never switched on by environment variables: the site processes this
module starts run through ``tests/launcher.py`` (``python -m tests.launcher``), which builds the
site agent with the hooks and runs it, so this driver needs a checkout (``make faults``), not
just an installed fedmq. Nothing here runs in production.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pika

from broker import topology
from broker.provision import AGGREGATOR_USER
from experiments.federation import VHOST, Federation, FederationSpec, SiteTraining

logger = logging.getLogger(__name__)

OBSERVER_QUEUE = "fedmq.faults.observer"
#: the test launcher that injects the site hooks (plaintext recording, a kill mid-publish)
LAUNCHER_MODULE = "tests.launcher"
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ plan


@dataclass
class FaultPlan:
    aggregator_kills: int = 20
    broker_restarts: int = 1
    connection_closes: int = 1
    #: the victim site is SIGKILLed after the first chunk of its n-th multi-chunk update
    site_mid_publish_kills: int = 1
    mid_publish_update: int = 2
    planned_rounds: int = 30
    buffer_size: int = 2
    target_epsilon: float = 1.2
    #: the settings' minimum: small enough that small_cnn's top-k update (three 25 kB ciphertexts)
    #: takes two chunks, so a site can be killed between them
    max_message_bytes: int = 64 * 1024
    #: random pause before each event, counted from the moment the aggregator consumes again
    pause_s: tuple[float, float] = (0.3, 2.5)
    seed: int = 0
    #: bound on any process's recovery (restart -> consuming / connected)
    max_recovery_s: float = 45.0
    time_limit_s: float = 900.0
    train_samples: int | None = None  # informational (the slice is prepared by the caller)


@dataclass
class LiveResult:
    seed: int
    wall_seconds: float
    kills: int
    broker_restarts: int
    connection_closes: int
    connections_closed: int
    site_mid_publish_kills: int
    updates_built: int
    updates_confirmed: int
    updates_counted: int
    lost: list[str]
    duplicates: list[str]
    counted_unconfirmed: list[str]
    partial_pending: list[str]
    final_version: int
    model_max_abs_error: float
    min_update_contribution: float
    sites_agree_with_aggregator: bool
    epsilon_by_site: dict[str, float]
    epsilon_target: float
    recovery_seconds: dict[str, list[float]]
    first_accept_after_restart_s: list[float]
    max_recovery_seconds: float
    dead_letters: dict[str, int]
    observed_versions: int
    contributor_weight_mismatches: int
    unexpected_exits: list[str]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problems() == []

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"lost updates: {self.lost}")
        if self.duplicates:
            out.append(f"duplicated updates: {self.duplicates}")
        if self.counted_unconfirmed:
            out.append(f"counted but never confirmed: {self.counted_unconfirmed}")
        if self.model_max_abs_error > 0.01 * self.min_update_contribution:
            out.append(f"decrypted model differs from the plaintext replay by {self.model_max_abs_error:.3g} "
                       f"(one update moves it by >= {self.min_update_contribution:.3g})")
        if not self.sites_agree_with_aggregator:
            out.append("a site's decrypted global model differs from the aggregator's state")
        over = {s: e for s, e in self.epsilon_by_site.items() if e > self.epsilon_target + 1e-9}
        if over:
            out.append(f"epsilon above target {self.epsilon_target}: {over}")
        if self.max_recovery_seconds > 45.0:
            out.append(f"recovery took {self.max_recovery_seconds:.1f}s")
        if self.contributor_weight_mismatches:
            out.append(f"{self.contributor_weight_mismatches} contributor weight(s) differ from the replay's")
        if self.unexpected_exits:
            out.append(f"processes exited unexpectedly: {self.unexpected_exits}")
        return out


# ------------------------------------------------------------------------------ federation


class FaultFederation(Federation):
    """A Federation whose site processes run with test hooks injected by ``tests/launcher.py``:
    every site records its plaintext updates; ``extra_hooks[site]`` adds launcher options for
    that site's next start (a kill mid-publish)."""

    def __init__(self, spec: FederationSpec, progress: Callable[[str], None] | None = None) -> None:
        super().__init__(spec, progress)
        self.extra_hooks: dict[str, list[str]] = {}
        if not (REPO_ROOT / "tests" / "launcher.py").is_file():
            raise RuntimeError(f"fault injection needs a fedmq checkout: {REPO_ROOT / 'tests' / 'launcher.py'} is missing")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / "logs" / f"{name}.log", "ab")
        self._stack.callback(log.close)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if name == "aggregator":
            argv = [sys.executable, "-m", "shared.cli", *args]
        else:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
            hooks = ["--record-plaintext", *self.extra_hooks.pop(name, [])]
            argv = [sys.executable, "-m", LAUNCHER_MODULE, *hooks, "--", *args]
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def append_config(self, name: str, values: dict[str, Any]) -> None:
        path = self.dir / "config" / f"{name}.toml"
        lines = []
        for k, v in values.items():
            lines.append(f"{k} = {json.dumps(v) if isinstance(v, str) else ('true' if v is True else 'false' if v is False else repr(v))}")
        with open(path, "a") as fh:
            fh.write("\n".join(lines) + "\n")

    @property
    def admin_url(self) -> str:
        assert self.node is not None
        return self.node.url_for_vhost(VHOST)

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        path = self.dir / "logs" / f"{name}.log"
        out = []
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def count_msg(self, name: str, prefix: str) -> int:
        return sum(1 for r in self.log_lines(name) if str(r.get("msg", "")).startswith(prefix))

    def site_state(self, site: str) -> dict[str, Any]:
        path = self.dir / "state" / site / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}


def _admin_channel(url: str) -> tuple[pika.BlockingConnection, Any]:
    params = pika.URLParameters(url)
    params.connection_attempts = 20
    params.retry_delay = 0.5
    conn = pika.BlockingConnection(params)
    return conn, conn.channel()


def declare_observer(url: str) -> None:
    conn, ch = _admin_channel(url)
    try:
        ch.queue_declare(OBSERVER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(OBSERVER_QUEUE, topology.GLOBAL_EXCHANGE, "")
    finally:
        conn.close()


def drain_observer(url: str) -> list[dict[str, Any]]:
    """Every global-version message the observer queue kept, reassembled per (version, mode, created_at)."""
    from shared.codec import decode_global_version

    conn, ch = _admin_channel(url)
    parts: dict[tuple, dict[int, Any]] = {}
    done: list[dict[str, Any]] = []
    try:
        while True:
            method, _props, body = ch.basic_get(OBSERVER_QUEUE, auto_ack=True)
            if method is None:
                break
            c = decode_global_version(body, max_bytes=64 << 20)
            key = (c.version, c.mode, c.created_at)
            parts.setdefault(key, {})[c.chunk_index] = c
            if len(parts[key]) == c.chunk_count:
                del parts[key]
                done.append({"version": c.version, "mode": c.mode, "contributors": [x.model_dump() for x in c.contributors]})
    finally:
        conn.close()
    return done


def drain_dead_letters(url: str) -> Counter:
    conn, ch = _admin_channel(url)
    reasons: Counter = Counter()
    try:
        while True:
            method, props, _body = ch.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                break
            h = props.headers or {}
            if topology.REASON_HEADER in h:
                reasons[str(h[topology.REASON_HEADER])] += 1
            else:  # dead-lettered by the broker itself (e.g. a bounded site queue dropping its oldest version)
                reasons[f"broker:{h.get('x-first-death-reason', '?')}:{h.get('x-first-death-queue', '?')}"] += 1
    finally:
        conn.close()
    return reasons


# ------------------------------------------------------------------------------ live run


class _Watch:
    """Watches one process's log for a line prefix appearing more often than before."""

    def __init__(self, fed: FaultFederation, name: str, prefix: str) -> None:
        self.fed, self.name, self.prefix = fed, name, prefix
        self.base = fed.count_msg(name, prefix)

    def seen(self) -> bool:
        return self.fed.count_msg(self.name, self.prefix) > self.base


def _wal_size(state_dir: Path) -> int:
    return sum(p.stat().st_size for p in state_dir.glob("wal-*.log") if p.exists())


class LiveRun:
    def __init__(self, plan: FaultPlan, workdir: Path, data_npz: Path, progress: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.progress = progress or (lambda m: None)
        spec = FederationSpec(
            workdir=workdir, data_npz=data_npz, n_sites=3, mode="async", buffer_size=plan.buffer_size,
            max_staleness=10_000, dp_enabled=True, target_epsilon=plan.target_epsilon,
            planned_rounds=plan.planned_rounds, seed=plan.seed, retrain_after_s=20.0,
            training=SiteTraining(lr=0.05, batch_size=32, local_epochs=1), amqp_url=None,
            time_limit_s=plan.time_limit_s,
        )
        self.fed = FaultFederation(spec, self.progress)
        self.recovery: dict[str, list[float]] = {"aggregator_restart": [], "broker_restart": [], "connection_close": [], "site_restart": []}
        self.first_accept: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.unexpected: list[str] = []
        self.victim = "hospital_2"
        self.kills = self.broker_restarts = self.closes = self.closed_conns = self.site_kills = 0
        self.started = 0.0

    # -- helpers ------------------------------------------------------------------------
    @property
    def agg_state(self) -> Path:
        return self.fed.dir / "state" / "aggregator"

    def _event(self, kind: str, **info: Any) -> None:
        rec = {"t": round(time.monotonic() - self.started, 2), "event": kind, **info}
        self.events.append(rec)
        self.progress(f"[{rec['t']:7.1f}s] {kind} {info if info else ''}")

    def _check_procs(self) -> None:
        """Restart the mid-publish victim when its hook fired; anything else dying is a failure."""
        for name, proc in list(self.fed.procs.items()):
            rc = proc.poll()
            if rc is None:
                continue
            if name == self.victim and rc == -signal.SIGKILL and self.site_kills < self.plan.site_mid_publish_kills:
                self.site_kills += 1
                self._event("site killed mid-publish", site=name)
                watch = _Watch(self.fed, name, "update published")
                t0 = time.monotonic()
                self.fed.spawn_site(name)
                self._pending_site_watch = (watch, t0)
            elif name == "aggregator" and rc == -signal.SIGKILL:
                continue  # ours; restarted by the caller
            else:
                self.unexpected.append(f"{name} rc={rc}")
                self._event("unexpected exit; restarting", name=name, rc=rc)
                if name == "aggregator":
                    self.fed.spawn_aggregator()
                else:
                    self.fed.spawn_site(name)

    def _poll_site_watch(self) -> None:
        w = getattr(self, "_pending_site_watch", None)
        if w is not None and w[0].seen():
            self.recovery["site_restart"].append(round(time.monotonic() - w[1], 2))
            self._event("victim re-published its pending update", seconds=self.recovery["site_restart"][-1])
            self._pending_site_watch = None

    def _wait(self, pred: Callable[[], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while True:
            self._check_procs()
            self._poll_site_watch()
            if pred():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.fed.dir / 'logs'}")
            time.sleep(0.05)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._check_procs()
            self._poll_site_watch()
            time.sleep(0.05)

    def _sites_done(self) -> bool:
        for s in self.fed.sites:
            st = self.fed.site_state(s)
            if st.get("updates_sent", 0) < self.plan.planned_rounds or st.get("pending_seq") is not None:
                return False
        return True

    # -- faults ---------------------------------------------------------------------------
    def kill_aggregator(self) -> None:
        proc = self.fed.procs["aggregator"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.kills += 1
        self._event("SIGKILL aggregator", n=self.kills)
        ready = _Watch(self.fed, "aggregator", "aggregator consuming")
        t0 = time.monotonic()
        self.fed.spawn_aggregator()
        took = self._wait(ready.seen, self.plan.max_recovery_s * 2, "the restarted aggregator to consume")
        self.recovery["aggregator_restart"].append(round(took, 2))
        self._first_accept_probe(t0)

    def _first_accept_probe(self, t0: float) -> None:
        """Record restart -> first WAL append (an update chunk consumed), if one comes within 3 s."""
        base = _wal_size(self.agg_state)
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            if _wal_size(self.agg_state) > base:
                self.first_accept.append(round(time.monotonic() - t0, 2))
                return
            time.sleep(0.05)

    def _reconnect_watches(self) -> list[_Watch]:
        return [_Watch(self.fed, "aggregator", "aggregator consuming")] + [_Watch(self.fed, s, "connected") for s in self.fed.sites]

    def restart_broker(self) -> None:
        """Stop and start the node; recovery = broker accepting TCP again -> last process consuming/connected
        (from the processes' own log timestamps)."""
        from broker.local_node import _port_open

        node = self.fed.node
        assert node is not None
        watches = self._reconnect_watches()
        self.broker_restarts += 1
        self._event("broker restart")
        t0 = time.monotonic()
        node.stop()
        opened: list[float] = []

        def probe() -> None:
            while not opened and time.monotonic() - t0 < 300:
                if _port_open(node.host, node.amqp_port):
                    opened.append(time.time())
                    return
                time.sleep(0.02)

        th = threading.Thread(target=probe, daemon=True)
        th.start()
        node.start()
        th.join(5)
        self._event("broker back", seconds=round(time.monotonic() - t0, 2))
        self._wait(lambda: all(w.seen() for w in watches), self.plan.max_recovery_s * 2, "every process to reconnect after the broker restart")
        back = opened[0] if opened else time.time()
        last = max(self._first_ts_after(w, back) for w in watches)
        self.recovery["broker_restart"].append(round(max(0.0, last - back), 2))

    def _first_ts_after(self, w: _Watch, since: float) -> float:
        from datetime import datetime

        n = 0
        for r in self.fed.log_lines(w.name):
            if str(r.get("msg", "")).startswith(w.prefix):
                n += 1
                if n > w.base:
                    return datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp()
        return since

    def close_connections(self) -> None:
        assert self.fed.node is not None
        users = {AGGREGATOR_USER, *self.fed.sites}
        out = self.fed.node.rabbitmqctl("list_connections", "pid", "user", "--no-table-headers")
        pids = []
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip() in users:
                pids.append(parts[0].strip())
        watches = self._reconnect_watches()
        self.closes += 1
        for pid in pids:
            try:
                self.fed.node.rabbitmqctl("close_connection", pid, "fedmq fault injection")
                self.closed_conns += 1
            except Exception as exc:  # the connection went away by itself meanwhile
                logger.info("close_connection %s: %s", pid, exc)
        self._event("closed connections from the broker side", n=len(pids))
        t0 = time.monotonic()
        took = self._wait(lambda: all(w.seen() for w in watches), self.plan.max_recovery_s * 2, "every process to reconnect after close_connection")
        self.recovery["connection_close"].append(round(took, 2))
        del t0

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> LiveResult:
        p, fed = self.plan, self.fed
        started_wall = time.monotonic()
        fed.prepare()
        for site in fed.sites:
            fed.append_config(site, {"max_message_bytes": p.max_message_bytes, "reconnect_max_s": 2.0})
        fed.append_config("aggregator", {"max_message_bytes": p.max_message_bytes, "reconnect_max_s": 2.0,
                                         "staleness_exponent": 0.0, "housekeeping_s": 0.5})
        declare_observer(fed.admin_url)
        if p.site_mid_publish_kills:
            fed.extra_hooks[self.victim] = ["--crash-mid-publish", str(p.mid_publish_update)]
        self.started = time.monotonic()
        ready = _Watch(fed, "aggregator", "aggregator consuming")
        fed.spawn_aggregator()
        for site in fed.sites:
            fed.spawn_site(site)
        self._wait(ready.seen, 120, "the aggregator to consume")
        self._wait(lambda: _wal_size(self.agg_state) > 0, 240, "the first update")
        self._event("first update arrived")
        schedule = ["kill"] * p.aggregator_kills + ["broker"] * p.broker_restarts + ["close"] * p.connection_closes
        kills = [e for e in schedule if e == "kill"]
        others = [e for e in schedule if e != "kill"]
        self.rng.shuffle(others)
        # spread the rarer faults evenly among the kills
        # the rarer faults early (while every site still trains), spread among the first kills
        order: list[str] = list(kills)
        span = max(1, len(kills) // 2)
        for i, e in enumerate(others):
            order.insert(min(len(order), 1 + i + (i * span) // max(1, len(others))), e)
        for e in order:
            self._sleep(self.rng.uniform(*p.pause_s))
            if self._sites_done():
                # keep the federation live for every fault: give the sites more rounds of noise-free waiting
                self._event("sites finished early; injecting the remaining faults anyway")
            {"kill": self.kill_aggregator, "broker": self.restart_broker, "close": self.close_connections}[e]()
            if time.monotonic() - self.started > p.time_limit_s:
                raise TimeoutError("fault schedule exceeded the time limit")
        self._event("fault schedule done; waiting for the sites to finish")
        self._wait(self._sites_done, max(60.0, p.time_limit_s - (time.monotonic() - self.started)), "every site to finish its rounds")
        # everything confirmed should now be committed (or in the buffer); give the aggregator a moment
        self._wait(lambda: self._committed_count() >= self._confirmed_count() // p.buffer_size * p.buffer_size, 60, "the last commit")
        self._sleep(1.0)
        fed._terminate()
        self._event("stopped")
        return self._verify(time.monotonic() - started_wall)

    def _committed_count(self) -> int:
        from aggregator import checkpoint as cpmod

        try:
            cp = cpmod.load(self.agg_state)
        except Exception:  # mid-write: try again next poll
            return -1
        return sum(len(ids) for _, ids in cp.recent) if cp else 0

    def _confirmed_count(self) -> int:
        return sum(len(self._confirmed_seqs(s)) for s in self.fed.sites)

    def _confirmed_seqs(self, site: str) -> list[int]:
        st = self.fed.site_state(site)
        pending = st.get("pending_seq")
        return [q for q in range(1, int(st.get("next_seq", 1))) if q != pending]

    # -- verification ------------------------------------------------------------------------
    def _verify(self, wall: float) -> LiveResult:
        from aggregator.engine import AggregatorEngine
        from aggregator.fold import weight_units
        from aggregator.settings import AggregatorSettings
        from shared.ckks import decrypt_block, load_context, serialize
        from shared.settings import load_settings
        from site_agent.runtime import LEDGER_FILE
        from site_agent.training import PrivacyLedger

        fed = self.fed
        settings = load_settings(AggregatorSettings, fed.dir / "config" / "aggregator.toml")
        engine = AggregatorEngine(settings)  # offline: checkpoint + WAL replay, exactly what a restart sees
        try:
            committed = [(v, list(ids)) for v, ids in engine.recent]
            counted_list = [u for _, ids in committed for u in ids] + list(engine.buffer_ids)
            partial = sorted(engine.pending)
            secret = load_context(fed.keys.secret_context, require_secret=True)
            slots = secret.block_size
            D = {i: decrypt_block(secret, b) for i, b in engine._D_bytes.items()}
            B = {i: decrypt_block(secret, serialize(v)) for i, v in engine.buffer.items()}
            version, value_scale = engine.version, engine.value_scale
        finally:
            engine.close()
        confirmed: set[str] = set()
        built = 0
        plain: dict[str, dict[str, Any]] = {}
        for site in fed.sites:
            for q in self._confirmed_seqs(site):
                confirmed.add(f"{site}:{q}")
            for f in (fed.dir / "state" / site / "plaintext").glob("*.npz"):
                z = np.load(f)
                plain[f"{site}:{int(f.stem)}"] = {k: z[k] for k in z.files}
                built += 1
        counted = set(counted_list)
        dups = sorted(u for u, n in Counter(counted_list).items() if n > 1)
        # plaintext replay over the counted ids (weights: staleness exponent 0 -> sample weight only)
        expect: dict[int, np.ndarray] = {}
        contributions = []
        units_by_uid = {}
        for uid in counted_list:
            rec = plain[uid]
            m = weight_units(0, float(rec["sample_weight"]), quantum=settings.weight_quantum, exponent=settings.staleness_exponent,
                             reference_sample_weight=settings.reference_sample_weight)
            units_by_uid[uid] = m
            for idx, blk in zip(rec["indices"], rec["blocks"]):
                expect[int(idx)] = expect.get(int(idx), 0.0) + m * blk
            contributions.append(float(value_scale * m * np.abs(rec["blocks"]).max()))
        got: dict[int, np.ndarray] = {}
        for src in (D, B):
            for i, v in src.items():
                got[i] = got.get(i, 0.0) + v
        err = 0.0
        for i in set(got) | set(expect):
            diff = np.asarray(got.get(i, np.zeros(slots))) - np.asarray(expect.get(i, np.zeros(slots)))
            err = max(err, float(value_scale * np.abs(diff).max()))
        # every site holding the final version decrypted the same D
        agree = True
        for site in fed.sites:
            st = fed.site_state(site)
            if st.get("version") == version:
                gs = np.load(fed.dir / "state" / site / f"global-{st['generation']}.npy")
                dense = np.zeros(((gs.size + slots - 1) // slots) * slots)
                for i, v in D.items():
                    dense[i * slots:(i + 1) * slots] = v
                if float(value_scale * np.abs(dense[: gs.size] - gs).max()) > 1e-6:
                    agree = False
        eps = {}
        for site in fed.sites:
            ledger = fed.dir / "state" / site / LEDGER_FILE
            eps[site] = float(PrivacyLedger.load(ledger).epsilon_spent()) if ledger.exists() else 0.0
        observed = drain_observer(fed.admin_url)
        mismatches = 0
        for msg in observed:
            for c in msg["contributors"]:
                if units_by_uid.get(c["update_id"]) not in (None, c["weight_units"]):
                    mismatches += 1
        dead = drain_dead_letters(fed.admin_url)
        rec_all = [x for v in self.recovery.values() for x in v]
        return LiveResult(
            seed=self.plan.seed, wall_seconds=round(wall, 1), kills=self.kills, broker_restarts=self.broker_restarts,
            connection_closes=self.closes, connections_closed=self.closed_conns, site_mid_publish_kills=self.site_kills,
            updates_built=built, updates_confirmed=len(confirmed), updates_counted=len(counted),
            lost=sorted(confirmed - counted), duplicates=dups, counted_unconfirmed=sorted(counted - confirmed),
            partial_pending=partial, final_version=version, model_max_abs_error=err,
            min_update_contribution=min(contributions) if contributions else 0.0,
            sites_agree_with_aggregator=agree, epsilon_by_site=eps, epsilon_target=self.plan.target_epsilon,
            recovery_seconds=self.recovery, first_accept_after_restart_s=self.first_accept,
            max_recovery_seconds=max(rec_all) if rec_all else 0.0, dead_letters=dict(dead),
            observed_versions=len(observed), contributor_weight_mismatches=mismatches,
            unexpected_exits=self.unexpected, events=self.events,
        )

    def close(self) -> None:
        self.fed.close()


def run_live(plan: FaultPlan, workdir: Path, data_npz: Path, progress: Callable[[str], None] | None = None) -> LiveResult:
    run = LiveRun(plan, workdir, data_npz, progress)
    try:
        return run.run()
    finally:
        run.close()


def small_slice(npz: Path, out: Path, *, train: int = 600, val: int = 120, test: int = 160, seed: int = 0) -> Path:
    """A seeded slice of PneumoniaMNIST (same keys and classes) so federations run in seconds."""
    rng = np.random.default_rng(seed)
    data = np.load(npz)
    arrays = {}
    for split, n in (("train", train), ("val", val), ("test", test)):
        idx = np.sort(rng.choice(len(data[f"{split}_labels"]), size=n, replace=False))
        arrays[f"{split}_images"] = data[f"{split}_images"][idx]
        arrays[f"{split}_labels"] = data[f"{split}_labels"][idx]
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    return out


# ------------------------------------------------------------------------------ fuzzing


@dataclass
class FuzzKit:
    """A one-site federation for fuzzing: keys, a valid multi-chunk update, the plaintext it carries."""

    root: Path
    secret: Any
    public_path: Path
    site_keys_dir: Path
    site: str
    signing: Any
    n_params: int
    slots: int

    @classmethod
    def create(cls, root: Path, n_params: int | None = None, site: str = "alpha") -> "FuzzKit":
        from shared.ckks import init_keys, load_context
        from shared.signing import generate_aggregator_key, generate_site_key, load_private_key, private_key_path

        keys = init_keys(root / "keys")
        generate_aggregator_key(root / "keys")
        generate_site_key(root / "site-keys", site)
        secret = load_context(keys.secret_context, require_secret=True)
        return cls(root, secret, keys.public_context, root / "site-keys", site,
                   load_private_key(private_key_path(root / "site-keys", site)),
                   3 * secret.block_size + 100 if n_params is None else n_params, secret.block_size)

    def settings(self, state_dir: Path, **over: Any) -> Any:
        from aggregator.settings import AggregatorSettings

        base: dict[str, Any] = dict(public_context=self.public_path, site_keys_dir=self.site_keys_dir, state_dir=state_dir,
                                    signing_key=self.root / "keys" / "aggregator.hybrid",
                                    check_user_id=False, log_json=False, buffer_size=1, housekeeping_s=0.2,
                                    incomplete_timeout_s=30.0, snapshot_every=0, max_message_bytes=256 * 1024,
                                    staleness_exponent=0.0, max_staleness=10_000)
        base.update(over)
        return AggregatorSettings(**base)

    def update(self, seq: int, rng: np.random.Generator, max_message_bytes: int = 100_000) -> tuple[list[bytes], dict[int, np.ndarray]]:
        from shared.codec import encode_update_chunk
        from site_agent.update_builder import UpdateIdentity, build_update

        delta = rng.uniform(-0.5, 0.5, self.n_params)
        built = build_update(delta, None, UpdateIdentity(self.site, seq, 0, 1.0), self.secret, "layout-fuzz-0001",
                             self.signing, mode="dense", max_message_bytes=max_message_bytes)
        padded = np.zeros(-(-self.n_params // self.slots) * self.slots)
        padded[: delta.size] = delta
        sent = {i: padded[i * self.slots:(i + 1) * self.slots].copy() for i in built.sent_indices}
        return [encode_update_chunk(c) for c in built.chunks], sent

    def decrypt_max_error(self, blocks: dict[int, bytes], expect: dict[int, np.ndarray], units: int) -> float:
        from shared.ckks import decrypt_block

        err = 0.0
        for i in set(blocks) | set(expect):
            got = decrypt_block(self.secret, blocks[i]) if i in blocks else np.zeros(self.slots)
            want = units * expect.get(i, np.zeros(self.slots))
            err = max(err, float(np.abs(got - want).max()))
        return err


def damage_ciphertext(ct: bytes, how: int, pos: int, junk: bytes, foreign: bytes) -> bytes:
    """One of the ways a ciphertext can be damaged (``shared.ckks_wire``'s layout): truncated,
    bit-flipped, spliced, wrong seed length, wrong parameters byte, another key's ciphertext."""
    how %= 6
    if how == 0:
        return ct[: pos % len(ct)]
    if how == 1:
        b = bytearray(ct)
        b[pos % len(b)] ^= 1 << (pos % 8)
        return bytes(b)
    if how == 2:
        p = pos % (len(ct) + 1)
        return ct[:p] + junk + ct[p:]
    if how == 3:
        return ct[:17] + bytes([(64 + 1 + pos) % 64 or 1]) + ct[18:]  # any seed length but 64
    if how == 4:
        return ct[:3] + bytes([ct[3] ^ (1 + pos % 255)]) + ct[4:]
    return foreign


def resign_with_ciphertext(kit: "FuzzKit", body: bytes, damage: Any) -> bytes:
    """The chunk with its first block's ciphertext replaced by ``damage(ct)``, signed again by the
    site: a broken site, whose signature verifies, so only the ciphertext checks can refuse it."""
    from shared.codec import decode_update_chunk, encode_update_chunk
    from shared.signing import sign_chunk

    chunk = decode_update_chunk(body, max_bytes=1 << 24)
    first, *rest = chunk.blocks
    bad = first.model_copy(update={"ciphertext": damage(first.ciphertext)})
    return encode_update_chunk(sign_chunk(chunk.model_copy(update={"blocks": (bad, *rest)}), kit.signing))


def _mutations(valid: list[bytes], resign: Any = None):  # type: ignore[no-untyped-def]
    """Hypothesis strategy of bodies: random bytes, msgpack of random structures, mutated valid chunks
    and (with ``resign``) valid chunks whose ciphertext is damaged and signed again."""
    import msgpack
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                     st.text(max_size=20), st.binary(max_size=64))
    tree = st.recursive(leaf, lambda kids: st.one_of(st.lists(kids, max_size=6),
                                                      st.dictionaries(st.text(max_size=12), kids, max_size=6)), max_leaves=24)
    base = st.sampled_from(valid)

    def flip(args: tuple[bytes, int, int]) -> bytes:
        b, pos, bit = args
        b = bytearray(b)
        b[pos % len(b)] ^= 1 << bit
        return bytes(b)

    def splice(args: tuple[bytes, int, bytes]) -> bytes:
        b, pos, junk = args
        p = pos % (len(b) + 1)
        return b[:p] + junk + b[p:]

    def field_swap(args: tuple[bytes, str, Any]) -> bytes:
        b, key, value = args
        try:
            obj = msgpack.unpackb(b, raw=False, strict_map_key=False)
        except Exception:
            return b
        if isinstance(obj, dict) and obj:
            k = key if key in obj or not obj else sorted(obj, key=str)[hash(key) % len(obj)]
            obj[k] = value
        return msgpack.packb(obj, use_bin_type=True)

    def drop_field(args: tuple[bytes, int]) -> bytes:
        b, n = args
        try:
            obj = msgpack.unpackb(b, raw=False, strict_map_key=False)
        except Exception:
            return b
        if isinstance(obj, dict) and obj:
            obj.pop(sorted(obj, key=str)[n % len(obj)])
        return msgpack.packb(obj, use_bin_type=True)

    return st.one_of(
        st.binary(max_size=2048),
        tree.map(lambda t: msgpack.packb(t, use_bin_type=True)),
        st.tuples(base, st.integers(0, 1 << 30)).map(lambda a: a[0][: a[1] % len(a[0])]),  # truncated
        st.tuples(base, st.integers(0, 1 << 30), st.integers(0, 7)).map(flip),
        st.tuples(base, st.integers(0, 1 << 30), st.binary(min_size=1, max_size=32)).map(splice),
        st.tuples(base, st.text(max_size=16), tree).map(field_swap),
        st.tuples(base, st.integers(0, 100)).map(drop_field),
        *([st.tuples(base, st.integers(0, 5), st.integers(0, 1 << 30), st.binary(min_size=1, max_size=32)).map(
            lambda a: resign(*a))] if resign else []),
    )


def fuzz_engine(root: Path, max_examples: int = 500, seed: int = 0) -> dict[str, Any]:
    """Property: ``accept`` on any bytes returns a Decision (never raises), never folds garbage,
    and the engine still folds the genuine update afterwards, exactly once."""
    from hypothesis import HealthCheck, given, seed as hseed, settings as hsettings

    from aggregator.engine import AggregatorEngine, Decision
    from shared.codec import decode_update_chunk

    kit = FuzzKit.create(root)
    rng = np.random.default_rng(seed)
    chunks, sent = kit.update(1, rng)
    originals = [decode_update_chunk(b, max_bytes=1 << 24) for b in chunks]
    foreign = _foreign_ciphertext(root)
    engine = AggregatorEngine(kit.settings(root / "state"))
    reasons: Counter = Counter()
    stats = {"cases": 0, "accepted_equivalent": 0}

    @hseed(seed)
    @hsettings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_mutations(chunks))
    def case(body: bytes) -> None:
        stats["cases"] += 1
        d = engine.accept(body, user_id=None, redelivered=False)
        assert isinstance(d, Decision) and d.action in ("accept", "reject", "drop")
        if d.action == "accept":
            # only a re-encoding of a genuine chunk can pass the signature: it is that chunk
            assert d.chunk is not None and any(d.chunk == o for o in originals), "accepted a chunk that is not genuine"
            stats["accepted_equivalent"] += 1
            engine.apply(d)
        else:
            reasons[d.reason] += 1

    try:
        case()
        # the ciphertext corpus: every kind of damage, at spread positions, signed again by the site
        # (so the signature verifies and only the ciphertext checks stand between it and the fold)
        prng = random.Random(seed)
        for how in range(6):
            for _ in range(8):
                pos, junk = prng.randrange(1 << 30), prng.randbytes(prng.randint(1, 32))
                body = resign_with_ciphertext(kit, prng.choice(chunks),
                                              lambda ct: damage_ciphertext(ct, how, pos, junk, foreign))
                stats["cases"] += 1
                d = engine.accept(body, user_id=None, redelivered=False)
                if d.action != "reject" or not d.reason.startswith("ciphertext-"):
                    raise AssertionError(f"damaged ciphertext (kind {how}) not refused as one: {d.action} {d.reason}")
                reasons[d.reason] += 1
        # the genuine update still goes through, once
        for b in chunks:
            d = engine.accept(b, user_id=None, redelivered=False)
            engine.apply(d)
        assert engine.version == 1, f"the genuine update was not folded (version {engine.version})"
        err = kit.decrypt_max_error(engine._D_bytes, sent, 64)
        assert err < 1e-3, f"folded state differs from the genuine update by {err}"
        assert [u for _, ids in engine.recent for u in ids] == [f"{kit.site}:1"]
    finally:
        engine.close()
    return {"cases": stats["cases"], "accepted_equivalent": stats["accepted_equivalent"], "reasons": dict(reasons)}


def _foreign_ciphertext(root: Path) -> bytes:
    """A ciphertext made under another key (same preset), for the "another key" case."""
    from shared.ckks import encrypt_block, init_keys, load_context

    other = load_context(init_keys(root / "foreign-key").secret_context, require_secret=True)
    return encrypt_block(other, np.linspace(-1, 1, 64))


def fuzz_amqp(url: str, root: Path, n_random: int = 60, seed: int = 0) -> dict[str, Any]:
    """Raw publishes to a running aggregator: random bytes, truncated and oversized messages,
    wrong content types and headers. Every one is dead-lettered with a reason header, the
    aggregator stays up and still folds a genuine update afterwards (exactly once)."""
    from aggregator.consumer import AggregatorService

    kit = FuzzKit.create(root)
    rng = np.random.default_rng(seed)
    prng = random.Random(seed)
    chunks, sent = kit.update(1, rng)
    settings = kit.settings(root / "state", amqp_url=url, reconnect_initial_s=0.2, reconnect_max_s=1.0)
    conn, ch = _admin_channel(url)
    topology.declare(ch, topology.EXCHANGES, topology.aggregator_queue_specs())
    ch.confirm_delivery()
    bad: list[tuple[bytes, pika.BasicProperties]] = []

    def props(**over: Any) -> pika.BasicProperties:
        return pika.BasicProperties(delivery_mode=2, **over)

    junk_types = ["text/plain", "application/json", "", "application/x-msgpack; charset=evil", "\u00e9\u00e8" * 10]
    foreign = _foreign_ciphertext(root)
    for i in range(n_random):
        kind = i % 7
        if kind == 0:
            body = prng.randbytes(prng.randint(0, 4096))
        elif kind == 1:
            c = prng.choice(chunks)
            body = c[: prng.randint(0, len(c) - 1)]
        elif kind == 2:
            c = bytearray(prng.choice(chunks))
            for _ in range(prng.randint(1, 8)):
                c[prng.randrange(len(c))] ^= 1 << prng.randrange(8)
            body = bytes(c)
        elif kind == 3:
            body = prng.randbytes(300 * 1024)  # oversized (limit 256 KiB)
        elif kind == 4:
            body = json.dumps({"kind": "update_chunk", "site_id": kit.site, "n": i}).encode()
        elif kind == 5:  # a signed chunk whose ciphertext is damaged (or another key's)
            how, pos, junk = prng.randrange(6), prng.randrange(1 << 30), prng.randbytes(prng.randint(1, 32))
            body = resign_with_ciphertext(kit, prng.choice(chunks),
                                          lambda ct: damage_ciphertext(ct, how, pos, junk, foreign))
        else:
            body = b""
        hdrs = {"x-fuzz": prng.choice([1, "two", -7, True, b"\x00\x01", {"nested": [1, 2, {"x": None}]}])}
        if i % 4 == 0:
            hdrs[topology.REASON_HEADER] = "spoofed"
        p = props(content_type=prng.choice(junk_types), headers=hdrs, type=prng.choice(["update-chunk", "x", None]),
                  priority=prng.choice([None, 0, 9]), message_id=f"fuzz-{i}")
        bad.append((body, p))
    svc = AggregatorService(settings)
    thread = threading.Thread(target=svc.run, daemon=True)
    thread.start()
    try:
        if not svc.ready.wait(30):
            raise AssertionError("aggregator did not connect")
        for body, p in bad:
            ch.basic_publish(topology.UPDATES_EXCHANGE, topology.shard_key(0), body, p, mandatory=True)
        # a genuine update with odd properties afterwards: the content type is advisory, the body decides
        for b in chunks:
            ch.basic_publish(topology.UPDATES_EXCHANGE, topology.shard_key(0), b,
                             props(content_type="text/plain", headers={"x-junk": "y"}), mandatory=True)
        deadline = time.monotonic() + 60
        while svc.engine.version < 1 and time.monotonic() < deadline:
            if not thread.is_alive():
                raise AssertionError("the aggregator thread died")
            time.sleep(0.1)
        assert svc.engine.version == 1, "the genuine update was not folded after the poison"
        reasons: Counter = Counter()
        missing_reason = 0
        got = 0
        deadline = time.monotonic() + 30
        while got < len(bad) and time.monotonic() < deadline:
            method, p, _b = ch.basic_get(topology.DEAD_LETTER_QUEUE, auto_ack=True)
            if method is None:
                conn.process_data_events(time_limit=0.1)
                continue
            got += 1
            r = (p.headers or {}).get(topology.REASON_HEADER)
            if not r or r == "spoofed":
                missing_reason += 1
            reasons[str(r)] += 1
        assert got == len(bad), f"{got} of {len(bad)} poison messages were dead-lettered"
        assert missing_reason == 0, "a dead letter lacks the aggregator's reason header"
        assert thread.is_alive() and svc.ready.is_set(), "the aggregator stopped consuming"
        err = kit.decrypt_max_error(svc.engine._D_bytes, sent, 64)
        assert err < 1e-3, f"folded state differs from the genuine update by {err}"
        assert svc.engine.updates_folded_total == 1
    finally:
        svc.stop()
        thread.join(30)
        conn.close()
    return {"cases": len(bad), "dead_lettered": got, "reasons": dict(reasons)}


# ------------------------------------------------------------------------------ everything


def run_all(out_dir: Path, data_npz: Path, *, runs: int = 1, plan: FaultPlan | None = None, fuzz_examples: int = 2000,
            amqp_fuzz: int = 120, progress: Callable[[str], None] | None = None, workdir: Path | None = None) -> dict[str, Any]:
    progress = progress or print
    plan = plan or FaultPlan()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = workdir or out_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    slice_npz = small_slice(data_npz, work / "pneumoniamnist-small.npz")
    results: list[LiveResult] = []
    for r in range(runs):
        p = FaultPlan(**{**asdict(plan), "seed": plan.seed + r})
        progress(f"live run {r + 1}/{runs} (seed {p.seed}): {p.aggregator_kills} aggregator kills, "
                 f"{p.broker_restarts} broker restart(s), {p.connection_closes} close_connection round(s), "
                 f"{p.site_mid_publish_kills} mid-publish site kill(s)")
        res = run_live(p, work / f"run-{r}", slice_npz, progress)
        results.append(res)
        progress(f"run {r + 1}: confirmed {res.updates_confirmed}, counted {res.updates_counted}, lost {len(res.lost)}, "
                 f"duplicates {len(res.duplicates)}, max recovery {res.max_recovery_seconds:.1f}s; problems: {res.problems() or 'none'}")
    progress(f"fuzzing AggregatorEngine.accept ({fuzz_examples} hypothesis examples)")
    fe = fuzz_engine(work / "fuzz-engine", fuzz_examples)
    progress(f"fuzzing over AMQP ({amqp_fuzz} raw publishes to a running aggregator)")
    from broker.local_node import LocalRabbitNode

    with LocalRabbitNode() as node:
        fa = fuzz_amqp(node.amqp_url, work / "fuzz-amqp", amqp_fuzz)
    summary = {
        "runs": len(results),
        "kills": sum(r.kills for r in results),
        "broker_restarts": sum(r.broker_restarts for r in results),
        "connection_closes": sum(r.connection_closes for r in results),
        "connections_closed": sum(r.connections_closed for r in results),
        "site_mid_publish_kills": sum(r.site_mid_publish_kills for r in results),
        "updates_confirmed": sum(r.updates_confirmed for r in results),
        "updates_counted": sum(r.updates_counted for r in results),
        "lost": sum(len(r.lost) for r in results),
        "duplicates": sum(len(r.duplicates) for r in results),
        "max_recovery_seconds": max((r.max_recovery_seconds for r in results), default=0.0),
        "max_epsilon": max((e for r in results for e in r.epsilon_by_site.values()), default=0.0),
        "epsilon_target": plan.target_epsilon,
        "fuzz_engine_cases": fe["cases"],
        "fuzz_amqp_cases": fa["cases"],
        "fuzz_cases": fe["cases"] + fa["cases"],
        "fuzz_engine_reasons": fe["reasons"],
        "fuzz_amqp_reasons": fa["reasons"],
        "problems": [p for r in results for p in r.problems()],
        "ok": all(r.ok for r in results),
        "wall_seconds": round(time.monotonic() - started, 1),
        "plan": asdict(plan),
        "run_details": [asdict(r) for r in results],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    progress(f"wrote {out_dir / 'results.json'}: ok={summary['ok']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from experiments import faults_cli

    return faults_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
