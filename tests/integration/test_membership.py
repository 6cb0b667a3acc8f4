"""Elastic membership on the real broker: processes for the aggregator and every site agent.

- async: a hospital that joins late catches up from a snapshot and contributes; a hospital that
  goes down does not stall the others for 5 versions;
- sync: the documented policy for a missing member (docs/aggregation.md, "Membership"): the
  round waits for every pinned site; nothing commits without it, and the round completes as
  soon as it comes (back).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from testkit.zygote import Zygote

from fedmq.experiments.federation import Federation, FederationSpec, SiteTraining

pytestmark = [pytest.mark.broker, pytest.mark.slow]

#: the version around which the third hospital joins (the issue says "around version 10"; a
#: smaller N proves the same path, a snapshot of a model several versions on, in less time)
JOIN_AT = 3
DOWN_FOR = 5


def _spec(tmp_path: Path, npz: Path, url: str, **over) -> FederationSpec:
    # enough rounds that the first two sites are still sending when the third has started and
    # the first is killed (a round on this slice takes about a second). No slowdown: nothing
    # here depends on the sites' relative speed, and a stretched round only makes the test wait.
    base = dict(workdir=tmp_path / "fed", data_npz=npz, n_sites=3, mode="async", buffer_size=2, planned_rounds=200,
                dp_enabled=False, training=SiteTraining(lr=0.05, batch_size=32, local_epochs=1), retrain_after_s=10.0,
                time_limit_s=400, amqp_url=url)
    base.update(over)
    return FederationSpec(**base)


def _status(fed: Federation) -> dict:
    path = fed.dir / "state" / "aggregator" / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _site_state(fed: Federation, site: str) -> dict:
    path = fed.dir / "state" / site / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _folded(fed: Federation, site: str) -> dict:
    return _status(fed).get("sites", {}).get(site, {})


def _wait(pred, timeout: float, what: str, fed: Federation, allowed_dead: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = {n: p.returncode for n, p in fed.procs.items() if p.poll() is not None and n not in allowed_dead}
        if dead:
            pytest.fail(f"processes died while waiting for {what}: {dead}; logs in {fed.dir / 'logs'}")
        if pred():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; status {_status(fed)}; logs in {fed.dir / 'logs'}")


def _purge(url: str, site: str) -> None:
    import pika

    from fedmq.broker import topology

    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_purge(topology.site_queue(site))
    finally:
        conn.close()


def test_async_late_joiner_catches_up_and_a_site_down_does_not_stall(tmp_path: Path, small_npz: Path,
                                                                     amqp_url: str, zygote: Zygote) -> None:
    with Federation(_spec(tmp_path, small_npz, amqp_url), print, spawner=zygote) as fed:
        fed.prepare()
        first, second, late = fed.sites
        evaluator = fed.start(sites=[first, second])
        _wait(lambda: _status(fed).get("version", 0) >= JOIN_AT, 240, f"version {JOIN_AT} from two sites", fed)
        joined_at = _status(fed)["version"]
        assert _folded(fed, late).get("updates_folded", 0) == 0

        # a new hospital's queue starts empty (provisioned when it joins): nothing of the versions
        # before it is waiting there, so the only way to the current model is a snapshot
        _purge(amqp_url, late)
        fed.spawn_site(late)
        # it asks for a snapshot on start and holds a version at least as new as the one it joined at
        _wait(lambda: _site_state(fed, late).get("version", 0) >= joined_at, 120, "the joiner's snapshot", fed)
        log = (fed.dir / "logs" / f"{late}.log").read_text()
        assert '"asked for a snapshot"' in log and '"mode":"snapshot"' in log
        # and contributes an update trained from the caught-up model
        _wait(lambda: _folded(fed, late).get("updates_folded", 0) >= 1
              and _folded(fed, late).get("last_base_version", -1) >= joined_at, 180, "an update of the joiner", fed)
        # it trained only after the snapshot: no round from x_0 (a round of budget spent on an
        # update the aggregator must refuse). Every update it built names a base version at least
        # the one it joined at. (A later update may still be refused as too stale when the two
        # other sites run far ahead of it: that is the staleness bound, not the join.)
        log = (fed.dir / "logs" / f"{late}.log").read_text()
        bases = [json.loads(line)["base_version"] for line in log.splitlines()
                 if '"msg":"update ready"' in line]
        assert bases and min(bases) >= joined_at, (bases, joined_at)

        # one hospital goes down: async mode keeps committing with the other two
        fed.procs[first].send_signal(signal.SIGKILL)
        fed.procs[first].wait()
        down_at = _status(fed)["version"]
        folded_before = _folded(fed, first).get("updates_folded", 0)
        _wait(lambda: _status(fed).get("version", 0) >= down_at + 1 + DOWN_FOR, 300,
              f"{DOWN_FOR} versions without {first}", fed, allowed_dead=(first,))
        # the version committed right after the kill may hold an update it had already sent;
        # none after that does, and the evaluator's timeline shows who carried the federation
        _wait(lambda: (evaluator.latest() or None) is not None
              and evaluator.latest().version >= down_at + 1 + DOWN_FOR, 60, "the evaluator", fed, allowed_dead=(first,))
        after = [s for s in evaluator.all_scores() if s.version > down_at + 1]
        assert len(after) >= DOWN_FOR
        assert all(first not in {site for site, _ in s.members} for s in after)
        assert any(late in {site for site, _ in s.members} for s in after)
        assert _folded(fed, first).get("updates_folded", 0) <= folded_before + 1

        from fedmq.experiments.demo import membership_section

        table = "\n".join(membership_section(evaluator.all_scores(), list(fed.sites)))
        assert "## Membership timeline" in table and late in table


def test_sync_round_waits_for_a_missing_member(tmp_path: Path, small_npz: Path, amqp_url: str, zygote: Zygote) -> None:
    """Sync policy: wait. Two of three pinned sites send their round; the aggregator folds both
    and commits nothing; the third arrives and the round commits with all three."""
    # one round is the whole proof: the pinned round that waits, then commits with all three
    spec = _spec(tmp_path, small_npz, amqp_url, mode="sync", planned_rounds=1, retrain_after_s=600.0)
    with Federation(spec, print, spawner=zygote) as fed:
        fed.prepare()
        first, second, missing = fed.sites
        evaluator = fed.start(sites=[first, second])
        _wait(lambda: _status(fed).get("buffer_fill", 0) == 2, 180, "two of three round updates folded", fed)
        # the round is open and waits: both updates are in the buffer, the version has not moved
        # (the engine commits in the same call that folds the last update, so had the policy been
        # "proceed with two", version 1 would be in this same status)
        status = _status(fed)
        assert status["version"] == 0 and status["buffer_fill"] == 2 and status["buffer_size"] == 3
        fed.spawn_site(missing)
        _wait(lambda: _status(fed).get("version", 0) >= 1, 180, "the round to complete", fed)
        _wait(lambda: bool(evaluator.all_scores()), 60, "the evaluator", fed)
        first_version = evaluator.all_scores()[0]
        assert first_version.version == 1
        assert sorted(site for site, _ in first_version.members) == sorted(fed.sites)
