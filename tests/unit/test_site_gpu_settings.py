"""Site settings for GPU training: device, preset input size, micro-batch, engine, secure noise.

Each comes from env, ``.env`` or the TOML file like every setting; bad combinations are refused
at start with a message naming both sides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmq.site_agent.models import PRESETS
from fedmq.shared.errors import ConfigError
from fedmq.shared.settings import load_settings
from fedmq.site_agent.runtime import training_config
from fedmq.site_agent.settings import SiteSettings
from fedmq.site_agent.training.rng import SecureRandom, chacha20_words_openssl, chacha20_words_torch

REQUIRED = 'site_id = "h1"\nsecret_context = "s.ckks"\nsigning_key = "k"\naggregator_public_key = "a.pub"\nmanifest = "m.csv"\nstate_dir = "st"\n'


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("FEDMQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _load(tmp_path: Path, extra: str = "") -> SiteSettings:
    path = tmp_path / "site.toml"
    path.write_text(REQUIRED + extra)
    return load_settings(SiteSettings, path)


def test_defaults_secure_noise_auto_device_and_preset_size(tmp_path: Path) -> None:
    s = _load(tmp_path, 'model_preset = "resnet50_224"\n')
    assert s.image_size == 224 and s.device == "auto" and s.secure_noise is True and s.dp_engine == "bk"
    cfg = training_config(s)
    assert cfg.dp.secure_noise and cfg.device == "auto" and cfg.physical_batch() == PRESETS["resnet50_224"].physical_batch == 128


def test_device_and_batch_from_toml_env_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _load(tmp_path, 'device = "cpu"\nmax_physical_batch = 16\ndp_engine = "hooks"\n')
    assert (s.device, s.max_physical_batch, s.dp_engine) == ("cpu", 16, "hooks")
    (tmp_path / ".env").write_text("FEDMQ_DEVICE=cuda:1\n")
    assert _load(tmp_path, 'device = "cpu"\n').device == "cuda:1"  # .env beats TOML
    monkeypatch.setenv("FEDMQ_DEVICE", "cuda")
    monkeypatch.setenv("FEDMQ_MAX_PHYSICAL_BATCH", "8")
    s = _load(tmp_path, 'device = "cpu"\n')
    assert s.device == "cuda" and training_config(s).physical_batch() == 8


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('model_preset = "resnet50"\nimage_size = 224\n', r"image_size = 224 does not match model_preset 'resnet50'"),
        ('model_preset = "resnet18_224"\nimage_size = 28\n', r"image_size = 28 does not match model_preset 'resnet18_224'.*224"),
        ('device = "gpu"\n', "device"),
        ('max_physical_batch = 0\n', "max_physical_batch"),
        ('dp_engine = "ghost"\n', "dp_engine"),
        ('reproducible_noise = true\nsecure_noise = true\n', "reproducible_noise = true needs secure_noise = false"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, extra)


def test_reproducible_noise_turns_secure_noise_off(tmp_path: Path) -> None:
    s = _load(tmp_path, "reproducible_noise = true\n")
    assert s.secure_noise is False and not training_config(s).dp.secure_noise


def test_chacha20_matches_rfc8439_and_openssl() -> None:
    # RFC 8439 section 2.3.2: key 00..1f, nonce 00:00:00:09:00:00:00:4a:00:00:00:00, block counter 1
    key, nonce = bytes(range(32)), bytes.fromhex("000000090000004a00000000")
    words = chacha20_words_torch(key, nonce, 32, torch.device("cpu")).to(torch.int64) & 0xFFFFFFFF
    assert [hex(int(w)) for w in words[16:20]] == ["0xe4e7f110", "0x15593bd1", "0x1fdd0f50", "0xc47120a3"]
    rng = np.random.default_rng(0)
    for n in (1, 15, 16, 17, 1000):
        k, nn_ = rng.bytes(32), rng.bytes(12)
        ours = (chacha20_words_torch(k, nn_, n, torch.device("cpu")).to(torch.int64) & 0xFFFFFFFF).numpy()
        assert (ours == chacha20_words_openssl(k, nn_, n)).all()


def test_secure_random_draws_are_fresh_and_gaussian() -> None:
    rng = SecureRandom(key=bytes(32))
    a, b = rng.normal((20_000,), 2.0, torch.device("cpu")), rng.normal((20_000,), 2.0, torch.device("cpu"))
    assert not torch.equal(a, b)  # a fresh nonce per draw: no keystream reuse
    assert abs(float(a.mean())) < 0.1 and abs(float(a.std()) - 2.0) < 0.1
    u = rng.uniform(10_000, torch.device("cpu"))
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 0.02
    assert sorted(rng.permutation(50, torch.device("cpu")).tolist()) == list(range(50))


def test_site_with_cuda_but_no_gpu_stops_before_keys_data_or_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``device = "cuda"`` on a machine without one: refused first thing at start (the key and
    manifest paths here do not exist, so any later step would fail differently), no state written."""
    from fedmq.site_agent.runtime import SiteRuntime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = _load(tmp_path, 'device = "cuda"\n')
    with pytest.raises(ConfigError, match=r"device = 'cuda' but this machine has no usable CUDA GPU"):
        SiteRuntime.open(s)
    assert not (tmp_path / "st").exists()
