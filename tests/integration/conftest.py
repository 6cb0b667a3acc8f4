"""Fixtures for end-to-end tests: the real PneumoniaMNIST file and a small slice of it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve()


def _find_npz() -> Path | None:
    roots = [os.environ.get("FEDMQ_DATA_ROOT"), HERE.parents[3] / "shared" / "data"]
    for root in roots:
        if root and (Path(root) / "pneumoniamnist.npz").is_file():
            return Path(root) / "pneumoniamnist.npz"
    return None


@pytest.fixture(scope="session")
def pneumonia_npz() -> Path:
    path = _find_npz()
    if path is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("CI needs ../shared/data/pneumoniamnist.npz (or FEDMQ_DATA_ROOT)")
        pytest.skip("pneumoniamnist.npz not found; set FEDMQ_DATA_ROOT")
    return path


@pytest.fixture(scope="session")
def small_npz(pneumonia_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded slice of the real data (same keys and classes) so federations run in seconds."""
    rng = np.random.default_rng(0)
    data = np.load(pneumonia_npz)
    sizes = {"train": 600, "val": 120, "test": 160}
    out = {}
    for split, n in sizes.items():
        idx = np.sort(rng.choice(len(data[f"{split}_labels"]), size=n, replace=False))
        out[f"{split}_images"] = data[f"{split}_images"][idx]
        out[f"{split}_labels"] = data[f"{split}_labels"][idx]
    path = tmp_path_factory.mktemp("data") / "pneumoniamnist-small.npz"
    np.savez_compressed(path, **out)
    return path
