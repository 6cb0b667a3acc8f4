"""Issue 18, findings 4 and 5 on the real broker: a site whose sequence went backwards (its state
directory was lost) is detected, told on its own queue, and shown in ``fedmq status``; a second
aggregator process on the same state directory exits with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


from fedmq.aggregator.status_cli import render
from integration.aggregator_helpers import (
    AggregatorThread, GlobalListener, connect, declare_topology, make_federation, publish, random_delta,
)
from fedmq.shared.codec import decode, encode
from fedmq.shared.schema import Rejection, SnapshotRequest

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def _site_queue_messages(url: str, site: str, timeout: float = 20.0) -> list:
    """Decode everything that reaches ``site``'s own queue (declared as the site declares it)."""
    from fedmq.broker import topology

    conn = connect(url)
    try:
        ch = conn.channel()
        spec = topology.site_queue_spec(site)
        topology.declare(ch, topology.EXCHANGES, (spec,))
        out, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, _props, body = ch.basic_get(spec.name, auto_ack=True)
            if method is None:
                if any(isinstance(m, Rejection) for m in out):
                    break
                conn.process_data_events(time_limit=0.2)
                continue
            out.append(decode(body, max_bytes=64 << 20))
        return out
    finally:
        conn.close()


def test_sequence_backwards_is_answered_on_the_site_queue_and_shown_in_status(tmp_path, amqp_url):
    from fedmq.broker import topology

    fed = make_federation(tmp_path, sites=("alpha",))
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url, sites=("alpha",))
    conn = connect(amqp_url)
    topology.declare(conn.channel(), topology.EXCHANGES, (topology.site_queue_spec("alpha"),))
    conn.close()
    rng = np.random.default_rng(5)
    listener = GlobalListener(amqp_url)
    try:
        with AggregatorThread(settings) as agg:
            for seq in (1, 2, 3):
                bodies = fed.update("alpha", seq, seq - 1, random_delta(rng, fed.n_params))[0]
                publish(amqp_url, bodies)
                listener.wait_for(lambda v, s=seq: v["version"] == s and v["mode"] == "delta")
            # the same update re-sent (a site re-publishing its pending update) is NOT an alarm
            publish(amqp_url, bodies)
            # ... but a *new* update under seq 1: the site lost its state dir and restarted from zero
            publish(amqp_url, fed.update("alpha", 1, 3, random_delta(rng, fed.n_params))[0])
            msgs = _site_queue_messages(amqp_url, "alpha")
            notices = [m for m in msgs if isinstance(m, Rejection)]
            assert notices and notices[0].reason == "sequence-backwards", msgs
            assert notices[0].last_seq == 3 and notices[0].update_id == "alpha:1"
            assert "state directory" in notices[0].detail
            assert agg.engine.sites["alpha"].sequence_backwards.count == 1  # the re-send raised none
            assert agg.engine.version == 3, "nothing of the backwards update is folded"
            # a fresh start (snapshot request with have_version -1) under the known id is answered too
            conn = connect(amqp_url)
            ch = conn.channel()
            ch.basic_publish(topology.CONTROL_EXCHANGE, topology.SNAPSHOT_REQUEST_KEY,
                             encode(SnapshotRequest(site_id="alpha", have_version=-1, reason="start")))
            conn.close()
            notices = [m for m in _site_queue_messages(amqp_url, "alpha") if isinstance(m, Rejection)]
            assert notices and notices[0].reason == "sequence-backwards" and notices[0].last_seq == 3
            assert "restore" in notices[0].detail
            agg.engine.write_status()
            status = json.loads((settings.state_dir / "status.json").read_text())
            entry = status["sites"]["alpha"]["sequence_backwards"]
            assert entry["last_seq"] == 3 and entry["count"] == 2
            assert "SEQUENCE WENT BACKWARDS" in render(status)
            # the site's state is restored from backup: it continues at seq 4 and the alert clears
            publish(amqp_url, fed.update("alpha", 4, 3, random_delta(rng, fed.n_params))[0])
            listener.wait_for(lambda v: v["version"] == 4 and v["mode"] == "delta")
            assert "SEQUENCE WENT BACKWARDS" not in render(agg.engine.status())
    finally:
        listener.close()


def test_second_aggregator_on_one_state_dir_exits_with_a_clear_message(tmp_path, amqp_url):
    fed = make_federation(tmp_path, sites=("alpha",))
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url, sites=("alpha",))
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_CHECK_USER_ID="false", FEDMQ_LOG_JSON="false")
    args = [sys.executable, "-m", "fedmq.shared.cli", "aggregator", "run", "--state-dir", str(settings.state_dir), "--buffer-size", "1",
            "--amqp-url", amqp_url, "--public-context", str(fed.public_path), "--site-keys", str(fed.site_keys_dir),
            "--signing-key", str(settings.signing_key)]
    with AggregatorThread(settings):
        proc = subprocess.run([*args, "--metrics-port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "in use by another fedmq process" in proc.stderr and str(settings.state_dir.resolve()) in proc.stderr
    assert "Traceback" not in proc.stderr


def _known_site(tmp_path: Path, amqp_url: str):
    """An aggregator that already folded two updates of site alpha, and alpha's settings."""
    from integration.site_kit import make_site_kit

    kit = make_site_kit(tmp_path / "kit")
    fed = make_federation(tmp_path / "fed", sites=("alpha",))
    # the site kit's keys are the federation's: alpha signs with its pinned key
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url, sites=("alpha",))
    site_settings = kit.settings(amqp_url=amqp_url, secret_context=fed.keys_dir / "site-secret.ckks",
                                 signing_key=fed.site_keys_dir / "alpha.hybrid", join_wait_s=20.0,
                                 aggregator_public_key=fed.keys_dir / "aggregator.hybrid.pub",
                                 reconnect_initial_s=0.1)
    return fed, settings, site_settings


@pytest.mark.parametrize("join_new", [False, True])
def test_a_fresh_site_under_a_known_identity_refuses_to_start(tmp_path, amqp_url, join_new):
    import threading

    from fedmq.site_agent.runtime import SiteRuntime
    from fedmq.site_agent.service import KnownIdentityWithoutState, SiteAgent

    fed, settings, site_settings = _known_site(tmp_path, amqp_url)
    if join_new:
        site_settings = site_settings.model_copy(update={"join_new_federation": True})
    rng = np.random.default_rng(9)
    with AggregatorThread(settings) as agg:
        for seq in (1, 2):
            publish(amqp_url, fed.update("alpha", seq, seq - 1, random_delta(rng, fed.n_params))[0])
        deadline = time.monotonic() + 30
        while agg.engine.version < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agg.engine.version == 2
        # alpha's state directory is gone: it starts with nothing
        rt = SiteRuntime.open(site_settings, load_data=False)
        agent = SiteAgent(site_settings, runtime=rt)
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                agent.run()
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        if join_new:
            deadline = time.monotonic() + 30
            while rt.pause_file.reason() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            agent.stop()
        t.join(60)
        assert not t.is_alive()
        rt.dir_lock.release()
    if join_new:
        # told to join a new federation, but this aggregator knows it: it pauses, never trains
        assert outcome == [None]
        assert "already accepted seq 2" in (rt.pause_file.reason() or "")
    else:
        assert len(outcome) == 1 and isinstance(outcome[0], KnownIdentityWithoutState), outcome
        assert "already accepted 2 update(s)" in str(outcome[0]) and "Restore the state directory" in str(outcome[0])
    assert rt.state.next_seq == 1 and rt.state.updates_sent == 0
    assert not (site_settings.state_dir / "privacy-ledger.json").exists(), "no budget was charged"
