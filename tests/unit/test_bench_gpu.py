"""``benchmarks.gpu`` is run only where a GPU is lent, so its round must not drift unnoticed in
between: one site round on the CPU (small_cnn, a few synthetic images), plain and DP, through the
same ``one_round`` the GPU run uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import gpu
from fedmq.shared.ckks import init_keys, load_context
from fedmq.shared.signing import generate_site_key, load_private_key
from fedmq.site_agent.data import load_dataset
from fedmq.site_agent.models import PRESETS
from fedmq.site_agent.training.device import resolve_device


@pytest.mark.slow
@pytest.mark.parametrize("dp", [False, True])
def test_one_round_runs_the_shipped_site_pipeline(tmp_path: Path, dp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "LOGICAL", 16)
    size = PRESETS["small_cnn"].input_size
    ds = load_dataset(gpu._write_site(tmp_path / "site", 48, size), size, "train")
    keys = load_context(init_keys(tmp_path / "keys").secret_context, require_secret=True)
    priv, _ = generate_site_key(tmp_path / "site-keys", "bench-site")
    row = gpu.one_round("small_cnn", dp=dp, device=resolve_device("cpu"), ds=ds, load_s=0.0, keys=keys,
                        signing=load_private_key(priv), physical=None, secure=dp)
    assert row["mode"] == ("dp" if dp else "plain")
    assert row["images"] == 48 and row["params"] == PRESETS["small_cnn"].n_params
    assert row["chunks"] >= 1 and row["bytes_published"] > 0 and row["blocks_sent"] >= 1
    assert (row["epsilon"] is not None) == dp
    assert row["total_s"] >= row["train_s"] + row["encrypt_s"]
