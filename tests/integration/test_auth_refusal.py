"""Issue 18: a wrong broker password must not retry forever (systemd would never mark the unit
failed). After a few 403 refusals in a row the aggregator and the site exit non-zero with one
line that names the user, the broker and what to check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pika
import pytest

from integration.aggregator_helpers import make_federation
from integration.site_kit import make_site_kit
from testkit.zygote import Zygote

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[2]


def _wrong_password(url: str) -> str:
    p = pika.URLParameters(url)
    return url.replace(f":{p.credentials.password}@", ":not-the-password@", 1)


def _run(argv: list[str], url: str, zygote: Zygote | None = None) -> subprocess.CompletedProcess:
    """``fedmq ARGV`` as a process (a site agent forked from the warm ``zygote`` when given)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), FEDMQ_AMQP_URL=url, FEDMQ_LOG_JSON="false",
               FEDMQ_RECONNECT_INITIAL_S="0.1", FEDMQ_RECONNECT_MAX_S="0.5", FEDMQ_CHECK_USER_ID="false")
    cmd = [sys.executable, "-m", "fedmq.shared.cli", *argv]
    if zygote is not None:
        return zygote.run(cmd, env, timeout=180)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def test_aggregator_exits_after_repeated_403(tmp_path, amqp_url):
    fed = make_federation(tmp_path, sites=("alpha",))
    proc = _run(["aggregator", "run", "--state-dir", str(tmp_path / "state"), "--public-context", str(fed.public_path),
                 "--site-keys", str(fed.site_keys_dir), "--signing-key", str(fed.keys_dir / "aggregator.hybrid")],
                _wrong_password(amqp_url))
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmq: error: giving up after 3 refusals in a row"), last
    assert "refused user" in last and "FEDMQ_AMQP_URL" in last
    assert "Traceback" not in proc.stderr


def test_site_exits_after_repeated_403(tmp_path, amqp_url, zygote):
    kit = make_site_kit(tmp_path / "kit")
    s = kit.settings(state_dir=tmp_path / "state")
    cfg = tmp_path / "site.toml"
    cfg.write_text("\n".join(f'{k} = "{v}"' for k, v in (
        ("site_id", s.site_id), ("secret_context", s.secret_context), ("signing_key", s.signing_key), ("aggregator_public_key", s.aggregator_public_key),
        ("manifest", s.manifest), ("state_dir", s.state_dir))) + "\n")
    proc = _run(["site", "run", "--config", str(cfg)], _wrong_password(amqp_url), zygote)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedmq: error: giving up after 3 refusals in a row") and "refused user" in last, last
    assert "Traceback" not in proc.stderr
    assert not (s.state_dir / "privacy-ledger.json").exists()
