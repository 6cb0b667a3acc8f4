"""Fixtures for the fault-injection tests: the real PneumoniaMNIST file and a seeded slice of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()


def _find_npz() -> Path | None:
    for root in (os.environ.get("FEDMQ_DATA_ROOT"), HERE.parents[3] / "shared" / "data"):
        if root and (Path(root) / "pneumoniamnist.npz").is_file():
            return Path(root) / "pneumoniamnist.npz"
    return None


@pytest.fixture(scope="session")
def faults_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600/120/160 seeded images of the real data so a federation trains in seconds."""
    from fedmq.experiments.faults import small_slice

    path = _find_npz()
    if path is None:
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail("CI needs ../shared/data/pneumoniamnist.npz (or FEDMQ_DATA_ROOT)")
        pytest.skip("pneumoniamnist.npz not found; set FEDMQ_DATA_ROOT")
    return small_slice(path, tmp_path_factory.mktemp("faults-data") / "pneumoniamnist-small.npz")
