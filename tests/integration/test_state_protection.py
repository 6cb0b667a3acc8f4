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

from aggregator.status_cli import render
from integration.aggregator_helpers import (
    AggregatorThread, GlobalListener, connect, declare_topology, make_federation, publish, random_delta,
)
from shared.codec import decode, encode
from shared.schema import Rejection, SnapshotRequest

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def _site_queue_messages(url: str, site: str, timeout: float = 20.0) -> list:
    """Decode everything that reaches ``site``'s own queue (declared as the site declares it)."""
    from broker import topology

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
    from broker import topology

    fed = make_federation(tmp_path, sites=("alpha",))
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url)
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
            assert agg.engine.sites["alpha"]["sequence_backwards"]["count"] == 1  # the re-send raised none
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
    finally:
        listener.close()


def test_second_aggregator_on_one_state_dir_exits_with_a_clear_message(tmp_path, amqp_url):
    fed = make_federation(tmp_path, sites=("alpha",))
    settings = fed.settings(amqp_url=amqp_url, buffer_size=1)
    declare_topology(amqp_url)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_CHECK_USER_ID="false", FEDMQ_LOG_JSON="false")
    args = [sys.executable, "-m", "shared.cli", "aggregator", "run", "--state-dir", str(settings.state_dir),
            "--amqp-url", amqp_url, "--public-context", str(fed.public_path), "--site-keys", str(fed.site_keys_dir)]
    with AggregatorThread(settings):
        proc = subprocess.run([*args, "--metrics-port", "0"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "in use by another fedmq process" in proc.stderr and str(settings.state_dir.resolve()) in proc.stderr
    assert "Traceback" not in proc.stderr
