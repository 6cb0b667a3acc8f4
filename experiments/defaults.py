"""Defaults that are rules, not numbers tuned to one dataset (docs/reproduction.md, "Defaults as rules").

Only the rules whose inputs are known when a run is configured live here as functions; the
others (the DP noise multiplier, computed by the site's accountant from the budget, rounds,
batch and data size) are computed where their inputs are.
"""

from __future__ import annotations

import math


def async_buffer_size(n_sites: int, *, dp: bool) -> int:
    """K for async mode: every site's worth of updates under DP (each version then averages the
    DP noise of n updates, as a sync round does, without waiting for any particular site);
    half the sites without DP (a version should not wait for the slowest half, and K = 1
    gives every update a version of its own)."""
    if n_sites < 1:
        raise ValueError("a federation has at least one site")
    return n_sites if dp else max(1, math.ceil(n_sites / 2))
