"""Issue 18: a site protects its state and its privacy budget on its own.

- one process per state directory (finding 4, site side);
- a privacy ledger never silently resets: half a state directory is refused (finding 5);
- the divergence guard pauses contributions on a diverged model, so no budget is spent on it
  (finding 1: the pilot spent 0.91 of 1.2 on a model with loss 120,538 and AUC 0.5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from integration.site_kit import make_site_kit
from fedmq.shared.errors import ConfigError
from fedmq.shared.statelock import StateDirLocked, lock_state_dir
from fedmq.site_agent.guard import DivergenceGuard
from fedmq.site_agent.runtime import LEDGER_FILE, SiteRuntime

ROOT = Path(__file__).resolve().parents[2]

HOLD = (
    "import sys, time; from fedmq.shared.statelock import lock_state_dir; "
    "lock_state_dir(sys.argv[1], 'test'); print('held', flush=True); time.sleep(120)"
)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    return make_site_kit(tmp_path_factory.mktemp("site"))


def _hold(state_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(state_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow  # runs the CLI in a subprocess
def test_second_process_on_a_state_dir_is_refused_with_a_clear_message(kit, tmp_path, zygote):
    from fedmq.aggregator.engine import AggregatorEngine
    from fedmq.aggregator.settings import AggregatorSettings

    state = tmp_path / "state"
    holder = _hold(state)
    try:
        with pytest.raises(StateDirLocked, match="in use by another fedmq process.*pid"):
            SiteRuntime.open(kit.settings(state_dir=state), load_data=False)
        agg = AggregatorSettings(public_context=kit.public_context, site_keys_dir=kit.site_keys_dir, state_dir=state,
                                 signing_key=kit.aggregator_key)
        with pytest.raises(StateDirLocked, match="write-ahead log"):
            AggregatorEngine(agg)
        assert not (state / "checkpoint.msgpack").exists(), "nothing may be written before the lock"
        # the CLI says so in one line and exits 2, no traceback
        cfg = tmp_path / "site.toml"
        s = kit.settings(state_dir=state)
        cfg.write_text("\n".join(f'{k} = "{v}"' for k, v in (
            ("site_id", s.site_id), ("secret_context", s.secret_context), ("signing_key", s.signing_key), ("aggregator_public_key", s.aggregator_public_key),
            ("manifest", s.manifest), ("state_dir", state))) + "\n")
        # a second process (forked from the tests' warm interpreter: the same CLI, its own pid)
        proc = zygote.run([sys.executable, "-m", "fedmq.shared.cli", "site", "run", "--config", str(cfg)],
                          dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert proc.returncode == 2 and "in use by another fedmq process" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops the lock with its holder: no stale lock after a crash
    lock_state_dir(state, "test").release()


def test_a_lost_ledger_is_refused_never_reset(kit, tmp_path):
    settings = kit.settings(state_dir=tmp_path / "s")
    rt = SiteRuntime.open(settings)
    assert rt.why_not_contribute() is None  # opens (creates) the ledger
    with rt.owner.edit() as st:
        st.updates_sent = 2
    rt.save_state()
    rt.dir_lock.release()
    ledger = settings.state_dir / LEDGER_FILE
    ledger.rename(tmp_path / "ledger-backup.json")
    with pytest.raises(ConfigError, match="privacy ledger .* is missing .* 2 update"):
        SiteRuntime.open(settings, load_data=False)
    # the other half (ledger there, no state.json) is also what a crash in the first round leaves:
    # it opens, and the aggregator is asked whether the id already contributed (test_state_protection)
    (tmp_path / "ledger-backup.json").rename(ledger)
    (settings.state_dir / "state.json").unlink()
    SiteRuntime.open(settings, load_data=False).dir_lock.release()


def test_divergence_guard_rules(tmp_path):
    g = DivergenceGuard.open(tmp_path / "guard.json", loss_factor=10.0, flat_auc_versions=3)
    assert g.observe(1, 0.60, 0.71) is None
    assert g.observe(2, 0.55, 0.74) is None
    alert = g.observe(3, 3336.0, 0.50)  # the pilot's version 1
    assert alert and "more than 10x the best" in alert
    # a restart remembers it (no training "once more" on the diverged model)
    g2 = DivergenceGuard.open(tmp_path / "guard.json", loss_factor=10.0, flat_auc_versions=3)
    assert g2.alert == alert and g2.best_loss == pytest.approx(0.55)
    assert g2.observe(4, 0.58, 0.70) is None  # healthy again: the pause lifts by itself
    for v in (5, 6):
        assert g2.observe(v, 0.69, 0.5) is None
    assert "AUC has been 0.5 for 3 versions" in g2.observe(7, 0.69, 0.5)
    assert g2.observe(8, float("nan"), 0.6).startswith("diverged: validation loss is nan")


def test_a_diverged_model_pauses_the_site_before_any_budget_is_spent(kit, tmp_path):
    settings = kit.settings(state_dir=tmp_path / "s", dp_enabled=True)
    rt = SiteRuntime.open(settings)
    healthy = rt.evaluate_current()
    assert rt.observe_version(healthy) is None and rt.why_not_contribute() is None
    eps0 = rt.epsilon_spent()
    # the server step scaled by the image count: x = x0 + 2000 * (a normal update)
    rng = np.random.default_rng(0)
    with rt.owner.edit() as st:
        st.global_sum = rng.normal(0, 1.0, rt.model.x0.size)
        st.value_scale = 2000.0 * 0.01
        st.version = 1
    diverged = rt.evaluate_current()
    assert diverged["loss"] > 10 * healthy["loss"]
    alert = rt.observe_version(diverged)
    assert alert and alert.startswith("diverged")
    assert "paused" in (rt.why_not_contribute() or "")
    assert rt.alert() and rt.alert().startswith("paused: diverged")
    assert rt.train_and_build(1) is False  # even if asked: nothing trained, nothing charged
    assert rt.epsilon_spent() == eps0 and rt.state.next_seq == 1
    guard = json.loads((settings.state_dir / "guard.json").read_text())
    assert guard["alert"] == alert


@pytest.mark.slow  # trains DP rounds
def test_long_rounds_log_a_progress_line_every_n_steps(kit, tmp_path, caplog):
    settings = kit.settings(state_dir=tmp_path / "s", dp_enabled=False, batch_size=2, local_epochs=2,
                            progress_every_steps=5)
    rt = SiteRuntime.open(settings)
    with caplog.at_level("INFO", logger="fedmq.site_agent.training.trainer"):
        assert rt.train_and_build(0) is True
    lines = [r.getMessage() for r in caplog.records if "step" in r.getMessage() and "of" in r.getMessage()]
    assert lines and lines[0].startswith("round 1: step 5 of ")


def test_fedmq_site_resume_lifts_a_pause(kit, tmp_path, capsys):
    from fedmq.shared.cli import main
    from fedmq.site_agent.guard import PauseFile

    settings = kit.settings(state_dir=tmp_path / "s")
    cfg = tmp_path / "site.toml"
    cfg.write_text("\n".join(f'{k} = "{v}"' for k, v in (
        ("site_id", settings.site_id), ("secret_context", settings.secret_context),
        ("signing_key", settings.signing_key), ("aggregator_public_key", settings.aggregator_public_key), ("manifest", settings.manifest), ("state_dir", settings.state_dir))) + "\n")
    PauseFile(settings.state_dir).pause("sequence-backwards", "state directory restored from an old copy")
    rt = SiteRuntime.open(settings, load_data=False)
    assert "paused until `fedmq site resume`" in (rt.why_not_contribute() or "")
    rt.dir_lock.release()
    assert main(["site", "resume", "--config", str(cfg)]) == 0
    assert "lifted the pause" in capsys.readouterr().out
    assert PauseFile(settings.state_dir).reason() is None


def test_site_refuses_to_start_with_another_federations_state(kit, tmp_path):
    """A state directory saved under one model layout (x_0 from init_seed 0) is refused by a
    site configured for another (init_seed 7): a different layout fingerprint. The fingerprint
    is a property of the settings and the saved state only, so a site kit on disk proves it;
    no federation or broker is involved (it used to build a whole one for this)."""
    state = tmp_path / "state"
    rt = SiteRuntime.open(kit.settings(state_dir=state), load_data=False)
    rt.save_state()
    with pytest.raises(ConfigError, match="layout_fingerprint"):
        SiteRuntime.open(kit.settings(state_dir=state, init_seed=7), load_data=False)
