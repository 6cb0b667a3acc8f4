"""The ``fedmq`` command: help works, ``keys init`` writes both files and never overwrites."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.shared.ckks import DEFAULT_PRESET, PUBLIC_CONTEXT_FILE, SECRET_CONTEXT_FILE, load_context
from fedmq.shared.cli import build_parser, main
from fedmq.shared.signing import load_private_key, load_public_key

ROOT = Path(__file__).resolve().parents[2]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fedmq" in out and "keys" in out


def test_help_as_a_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fedmq.shared.cli", "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "fedmq" in proc.stdout and "keys" in proc.stdout


def test_group_without_command_shows_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys"])
    assert info.value.code != 0  # argparse: the sub-command is required
    with pytest.raises(SystemExit) as info:
        main(["keys", "--help"])
    assert info.value.code == 0 and "init" in capsys.readouterr().out


def test_keys_init_writes_both_files_and_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert main(["keys", "init", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    secret, public = out / SECRET_CONTEXT_FILE, out / PUBLIC_CONTEXT_FILE
    assert secret.is_file() and public.is_file()
    assert "fingerprint" in printed and "SECRET" in printed
    assert load_context(secret, require_secret=True).is_private
    assert not load_context(public, require_secret=False).is_private
    before = (secret.read_bytes(), public.read_bytes())
    assert main(["keys", "init", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite" in err
    assert (secret.read_bytes(), public.read_bytes()) == before


def test_keys_init_with_preset(tmp_path: Path) -> None:
    assert main(["keys", "init", "--out", str(tmp_path), "--preset", DEFAULT_PRESET]) == 0
    assert load_context(tmp_path / PUBLIC_CONTEXT_FILE).preset.name == DEFAULT_PRESET
    with pytest.raises(SystemExit):
        main(["keys", "init", "--out", str(tmp_path / "x"), "--preset", "n2-q1"])


def test_keys_site(tmp_path: Path) -> None:
    assert main(["keys", "site", "--site-id", "site-a", "--out", str(tmp_path)]) == 0
    load_private_key(tmp_path / "site-a.hybrid")
    load_public_key(tmp_path / "site-a.hybrid.pub")
    assert main(["keys", "site", "--site-id", "site-a", "--out", str(tmp_path)]) == 2
    assert main(["keys", "site", "--site-id", "Not Valid", "--out", str(tmp_path)]) == 2


def test_keys_aggregator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "aggregator", "--out", str(tmp_path)]) == 0
    key = load_private_key(tmp_path / "aggregator.hybrid")
    pub = load_public_key(tmp_path / "aggregator.hybrid.pub")
    assert pub.fingerprint == key.public_key().fingerprint and pub.fingerprint in capsys.readouterr().out
    assert main(["keys", "aggregator", "--out", str(tmp_path)]) == 2  # never overwritten


def test_parser_has_the_keys_group() -> None:
    args = build_parser().parse_args(["keys", "init", "--out", "/x"])
    assert args.group == "keys" and args.command == "init" and callable(args.handler)


def test_keys_messages_name_toml_keys_and_public_files_can_live_apart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 18: messages name the TOML keys (secret_context, public_context, signing_key,
    site_keys_dir), and --public-out keeps public files out of the secret folders."""
    assert main(["keys", "init", "--out", str(tmp_path / "secret"), "--public-out", str(tmp_path / "public")]) == 0
    printed = capsys.readouterr().out
    assert "`secret_context`" in printed and "`public_context`" in printed and "--site-keys" not in printed
    assert sorted(p.name for p in (tmp_path / "public").iterdir()) == [PUBLIC_CONTEXT_FILE, "fingerprint.txt"]
    assert not (tmp_path / "secret" / PUBLIC_CONTEXT_FILE).exists()
    assert load_context(tmp_path / "public" / PUBLIC_CONTEXT_FILE).fingerprint == \
        load_context(tmp_path / "secret" / SECRET_CONTEXT_FILE, require_secret=True).fingerprint
    assert main(["keys", "site", "--site-id", "site-a", "--out", str(tmp_path / "private"),
                 "--public-out", str(tmp_path / "pinned")]) == 0
    printed = capsys.readouterr().out
    assert "`signing_key`" in printed and "`site_keys_dir`" in printed
    assert [p.name for p in (tmp_path / "pinned").iterdir()] == ["site-a.hybrid.pub"]
    assert [p.name for p in (tmp_path / "private").iterdir()] == ["site-a.hybrid"]
