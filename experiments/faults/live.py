"""Fault injection on a live federation: the *run* half of ``fedmq faults run`` for live faults.

``run_live(plan)`` starts a real federation (private RabbitMQ node, the aggregator and three
site agents as OS processes, DP on, multi-chunk updates) and, while it trains, injects:

- SIGKILL of the aggregator at random moments (restarted at once each time),
- a restart of the broker node,
- ``rabbitmqctl close_connection`` of every site's and the aggregator's connection,
- a site killed between the chunks of one update (a crash hook, see below).

Afterwards it measures exactly-once from the outside: the sites record the plaintext of every
update they build (a recording hook); the aggregator's durable state (checkpoint + WAL replayed
offline) says which update ids were counted; the committed model is decrypted with the sites'
secret key and compared with a plaintext replay over the counted ids. What it measured is a
:class:`~experiments.faults.plan.LiveResult`; ``experiments.faults.judge`` says whether it passed.

The processes run in a :class:`~experiments.faults.federation.FaultFederation`, whose sites
start through ``tests/launcher.py`` with the hooks injected (so this driver needs a checkout,
``make faults``). Nothing here runs in production.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.broker.provision import AGGREGATOR_USER
from fedmq.experiments.faults.federation import FaultFederation, declare_observer, drain_dead_letters, drain_observer
from fedmq.experiments.faults.plan import FaultCheckFailed, FaultPlan, LiveResult
from fedmq.experiments.federation import FederationSpec, SiteTraining, Spawner

logger = logging.getLogger(__name__)



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
    def __init__(self, plan: FaultPlan, workdir: Path, data_npz: Path, progress: Callable[[str], None] | None = None,
                 *, spawner: Spawner | None = None) -> None:
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
        self.fed = FaultFederation(spec, self.progress, spawner=spawner)
        self.recovery: dict[str, list[float]] = {"aggregator_restart": [], "broker_restart": [], "connection_close": [], "site_restart": []}
        self.first_accept: list[float] = []
        self.events: list[dict[str, Any]] = []
        self.unexpected: list[str] = []
        self.victim = "hospital_2"
        self.kills = self.broker_restarts = self.closes = self.closed_conns = self.site_kills = 0
        self.started = 0.0
        #: the mid-publish victim's watch after its restart, and when it restarted
        self._pending_site_watch: tuple[_Watch, float] | None = None

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
        w = self._pending_site_watch
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
                raise FaultCheckFailed(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.fed.dir / 'logs'}")
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
        node = self.fed.local_node
        watches = self._reconnect_watches()
        self.broker_restarts += 1
        self._event("broker restart")
        t0 = time.monotonic()
        node.stop()
        opened: list[float] = []

        def probe() -> None:
            while not opened and time.monotonic() - t0 < 300:
                if node.accepting_connections():
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
        from datetime import datetime, timezone

        n = 0
        for r in self.fed.log_lines(w.name):
            if str(r.get("msg", "")).startswith(w.prefix):
                n += 1
                if n > w.base:
                    return datetime.strptime(r["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
        return since

    def close_connections(self) -> None:
        node = self.fed.local_node
        users = {AGGREGATOR_USER, *self.fed.sites}
        out = node.rabbitmqctl("list_connections", "pid", "user", "--no-table-headers")
        pids = []
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and parts[1].strip() in users:
                pids.append(parts[0].strip())
        watches = self._reconnect_watches()
        self.closes += 1
        for pid in pids:
            try:
                node.rabbitmqctl("close_connection", pid, "fedmq fault injection")
                self.closed_conns += 1
            except Exception as exc:  # the connection went away by itself meanwhile
                logger.info("close_connection %s: %s", pid, exc)
        self._event("closed connections from the broker side", n=len(pids))
        took = self._wait(lambda: all(w.seen() for w in watches), self.plan.max_recovery_s * 2, "every process to reconnect after close_connection")
        self.recovery["connection_close"].append(round(took, 2))

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
        fed.terminate()
        self._event("stopped")
        return self._verify(time.monotonic() - started_wall)

    def _committed_count(self) -> int:
        from fedmq.aggregator import checkpoint as cpmod

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
        from fedmq.aggregator.engine import AggregatorEngine
        from fedmq.aggregator.fold import weight_units
        from fedmq.aggregator.settings import AggregatorSettings
        from fedmq.shared.ckks import decrypt_block, load_context, serialize
        from fedmq.shared.settings import load_settings
        from fedmq.site_agent.runtime import LEDGER_FILE
        from fedmq.site_agent.training import PrivacyLedger

        fed = self.fed
        settings = load_settings(AggregatorSettings, fed.dir / "config" / "aggregator.toml")
        engine = AggregatorEngine(settings)  # offline: checkpoint + WAL replay, exactly what a restart sees
        try:
            committed = [(v, list(ids)) for v, ids in engine.recent]
            counted_list = [u for _, ids in committed for u in ids] + list(engine.buffer_ids)
            partial = sorted(engine.pending)
            secret = load_context(fed.keys.secret_context, require_secret=True)
            slots = secret.block_size
            D = {i: decrypt_block(secret, b) for i, b in engine.D.data.items()}
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
            unexpected_exits=self.unexpected, max_recovery_bound_s=self.plan.max_recovery_s, events=self.events,
        )

    def close(self) -> None:
        self.fed.close()


def run_live(plan: FaultPlan, workdir: Path, data_npz: Path, progress: Callable[[str], None] | None = None, *,
             spawner: Spawner | None = None) -> LiveResult:
    """``spawner``: how the federation starts its processes (None: fresh interpreters; the
    tests inject one that forks the site agents from a pre-imported one)."""
    run = LiveRun(plan, workdir, data_npz, progress, spawner=spawner)
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


