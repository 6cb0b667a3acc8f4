"""Polling for a condition, the one way tests wait (never a fixed sleep, never a timed assertion:
the timeout only bounds a hang)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], object], what: str, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Return once ``pred()`` is true; raise ``AssertionError`` naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
