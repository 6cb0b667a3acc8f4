"""kill -9 at the dangerous points, restart, and the final model equals the plaintext sum of
exactly the confirmed updates, each counted once (crash hook injected by tests/launcher.py)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator import checkpoint as cpmod
from fedmq.aggregator.fold import weight_units
from integration.aggregator_helpers import PlainReplay, declare_topology, make_federation, publish, random_delta
from testkit.zygote import ProcessLike, Zygote

pytestmark = [pytest.mark.broker, pytest.mark.fault, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _start(fed, state: Path, url: str, crash: str | None, zygote: Zygote) -> ProcessLike:
    """The aggregator as its own process, forked from the zygote (``testkit.zygote``: the same
    ``main`` a fresh interpreter runs, without its imports), so kill -9 really ends a process."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT), FEDMQ_CHECK_USER_ID="false", FEDMQ_LOG_JSON="false", FEDMQ_STALENESS_EXPONENT="0", FEDMQ_REFERENCE_SAMPLE_WEIGHT="1",
        FEDMQ_MAX_STALENESS="1000", FEDMQ_HOUSEKEEPING_S="0.2", FEDMQ_PREFETCH="4",
    )
    run = ["aggregator", "run", "--state-dir", str(state), "--amqp-url", url,
           "--public-context", str(fed.public_path), "--site-keys", str(fed.site_keys_dir), "--buffer-size", "3",
           "--signing-key", str(fed.keys_dir / "aggregator.hybrid")]
    # the crash point is a hook the launcher injects; the product itself has no way to crash on purpose
    cmd = [sys.executable, "-m", "tests.launcher", "--crash-at", crash, "--", *run] if crash else [sys.executable, "-m", "fedmq.shared.cli", *run]
    with open(state.parent / "agg.log", "ab") as log:
        return zygote.spawn(cmd, env, log)


def _wait_version(state: Path, version: int, proc: ProcessLike, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cp = cpmod.load(state) if (state / cpmod.CHECKPOINT_FILE).exists() else None
        if cp is not None and cp.version >= version:
            return
        if proc.poll() is not None:
            raise AssertionError(f"aggregator exited with {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"version {version} not reached")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return make_federation(tmp_path_factory.mktemp("fed"))


@pytest.mark.parametrize("crash", ["after-wal:5", "before-ack:7", "after-fold:3", "after-checkpoint:1"])
def test_kill9_then_restart_folds_each_confirmed_update_once(crash, fed, tmp_path, amqp_url, zygote):
    declare_topology(amqp_url)
    state = tmp_path / "state"
    rng = np.random.default_rng(42)
    plain = PlainReplay()
    bodies = []
    for seq in (1, 2):
        for k, site in enumerate(fed.sites):
            w = (0.5, 1.0, 1.7)[k]
            b, sent = fed.update(site, seq, 0, random_delta(rng, fed.n_params), sample_weight=w,
                                 max_message_bytes=40_000)
            bodies += b
            plain.fold(sent, weight_units(0, w, quantum=64, exponent=0.0, reference_sample_weight=1.0))
    proc = _start(fed, state, amqp_url, crash, zygote)
    try:
        publish(amqp_url, bodies)  # returns once the broker confirmed every chunk
        assert proc.wait(60) == -signal.SIGKILL, "the crash hook did not fire"
        proc = _start(fed, state, amqp_url, None, zygote)
        _wait_version(state, 2, proc)
        time.sleep(0.5)  # any stray redelivery would be processed by now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGTERM must stop the aggregator cleanly"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cp = cpmod.load(state)
    assert cp.version == 2
    got = fed.model(cp.blocks, cp.value_scale)
    np.testing.assert_allclose(got, plain.model(fed.n_params, cp.value_scale), atol=1e-6)
    ids = [u for _, us in cp.recent for u in us]
    assert sorted(ids) == sorted(f"{s}:{q}" for s in fed.sites for q in (1, 2))
