"""``fedmq broker local --port P``: the node listens on P (not a random port), and prints the
environment an operator's rabbitmqctl needs (cookie, epmd port), which works as printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from fedmq.broker.local_node import find_rabbitmq_install, free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def test_broker_local_honours_port_and_prints_rabbitmqctl_environment(tmp_path):
    if find_rabbitmq_install() is None:
        pytest.skip("rabbitmq-server is not installed")
    port = free_port()
    out = tmp_path / "out.log"
    with out.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fedmq.shared.cli", "broker", "local", "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 180
        while "press Ctrl-C" not in out.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, out.read_text()
            time.sleep(0.5)
        text = out.read_text()
        assert f"AMQP port: {port}" in text and f":{port}/" in text, text
        conn = pika.BlockingConnection(pika.URLParameters(re.search(r"admin URL: (\S+)", text).group(1)))
        assert pika.URLParameters(re.search(r"admin URL: (\S+)", text).group(1)).port == port
        conn.close()
        ctl = re.search(r"rabbitmqctl: (.+)$", text, re.M).group(1)
        assert "ERL_EPMD_PORT=" in ctl and "HOME=" in ctl and ".erlang.cookie" in text
        res = subprocess.run(["sh", "-c", ctl], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0


def test_pilot_rabbitmq_conf_is_accepted_by_rabbitmq(tmp_path):
    """deploy/rabbitmq/rabbitmq.pilot.conf (the distribution broker's config in the pilot docs)
    loads into a real node; only its listener line is replaced by the private node's own."""
    from fedmq.broker.local_node import LocalRabbitNode

    if find_rabbitmq_install() is None:
        pytest.skip("rabbitmq-server is not installed")
    lines = [ln for ln in (ROOT / "deploy" / "rabbitmq" / "rabbitmq.pilot.conf").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#") and not ln.startswith("listeners.")
             and not ln.startswith("log.")]
    assert any(ln.startswith("max_message_size") for ln in lines)
    with LocalRabbitNode(extra_config=lines) as node:
        conn = pika.BlockingConnection(pika.URLParameters(node.amqp_url))
        conn.close()
        assert "134217728" in node.rabbitmqctl("eval", "application:get_env(rabbit, max_message_size).")
