"""fedmq.shared.sparsify: block top-k with error feedback loses nothing, only delays it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedmq.shared.sparsify import block_view, blocks_to_keep, densify, n_blocks, sparsify

values = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=64)


@st.composite
def cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None, int, float]:
    size = draw(st.integers(1, 300))
    block_size = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    delta = draw(hnp.arrays(dtype, size, elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)))
    residual = draw(st.none() | hnp.arrays(np.float64, size, elements=values))
    fraction = draw(st.floats(0.01, 1.0))
    return delta, residual, block_size, fraction


@settings(max_examples=150, deadline=None)
@given(cases())
def test_error_feedback_invariant_is_exact(case: tuple) -> None:
    delta, residual, block_size, fraction = case
    sparse, new_residual = sparsify(delta, residual, block_size, "topk", fraction)
    expected = delta.astype(np.float64) + (0.0 if residual is None else residual)
    sent = densify(sparse.indices, sparse.blocks, delta.size, block_size)
    assert new_residual.shape == delta.shape and new_residual.dtype == np.float64
    np.testing.assert_array_equal(sent + new_residual, expected)  # exactly, not approximately
    # a value is either sent or kept, never both
    assert not np.any((sent != 0) & (new_residual != 0))


@settings(max_examples=100, deadline=None)
@given(cases())
def test_topk_keeps_ceil_fraction_blocks_with_largest_norms(case: tuple) -> None:
    delta, residual, block_size, fraction = case
    sparse, _ = sparsify(delta, residual, block_size, "topk", fraction)
    acc = delta.astype(np.float64) + (0.0 if residual is None else residual)
    total = n_blocks(delta.size, block_size)
    assert sparse.total_blocks == total
    assert len(sparse.indices) == max(1, math.ceil(round(fraction * total, 9)))
    assert list(sparse.indices) == sorted(set(sparse.indices))
    assert sparse.blocks.shape == (len(sparse.indices), block_size)
    norms = np.linalg.norm(block_view(acc, block_size), axis=1)
    kept = norms[list(sparse.indices)]
    dropped = np.delete(norms, list(sparse.indices))
    if dropped.size:
        assert kept.min() >= dropped.max()
    np.testing.assert_array_equal(sparse.blocks, block_view(acc, block_size)[list(sparse.indices)])


@settings(max_examples=60, deadline=None)
@given(cases())
def test_dense_mode_sends_everything(case: tuple) -> None:
    delta, residual, block_size, _ = case
    sparse, new_residual = sparsify(delta, residual, block_size, "dense", 0.01)
    total = n_blocks(delta.size, block_size)
    assert sparse.indices == tuple(range(total))
    assert not np.any(new_residual)
    expected = delta.astype(np.float64) + (0.0 if residual is None else residual)
    np.testing.assert_array_equal(densify(sparse.indices, sparse.blocks, delta.size, block_size), expected)


def test_residual_carries_over_rounds() -> None:
    rng = np.random.default_rng(1)
    deltas = [rng.normal(size=100) for _ in range(5)]
    residual, sent_total = None, np.zeros(100)
    for d in deltas:
        sparse, residual = sparsify(d, residual, 10, "topk", 0.3)
        sent_total += densify(sparse.indices, sparse.blocks, 100, 10)
    np.testing.assert_allclose(sent_total + residual, np.sum(deltas, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("total", "fraction", "keep"),
    [(30, 0.1, 3), (10, 0.7, 7), (100, 0.07, 7), (10, 0.3, 3), (10, 0.25, 3), (3, 0.01, 1), (1, 1.0, 1), (7, 1.0, 7)],
)
def test_blocks_to_keep_is_ceil_of_the_decimal_fraction(total: int, fraction: float, keep: int) -> None:
    assert blocks_to_keep(total, "topk", fraction) == keep
    assert blocks_to_keep(total, "dense", fraction) == total


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_bad_fraction_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError):
        blocks_to_keep(10, "topk", fraction)


def test_ties_are_broken_by_index() -> None:
    sparse, _ = sparsify(np.ones(40), None, 10, "topk", 0.5)
    assert sparse.indices == (0, 1)


def test_residual_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError):
        sparsify(np.ones(10), np.ones(11), 4)
