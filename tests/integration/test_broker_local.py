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

