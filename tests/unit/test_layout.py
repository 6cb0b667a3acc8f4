"""fedmq.shared.layout: state_dict <-> flat vector round trip, fingerprints, refusal of other layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.shared.errors import FingerprintMismatch, LayoutMismatch
from fedmq.shared.layout import ModelLayout

names = st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True)
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64])


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    keys = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(draw(shapes), generator=gen, dtype=torch.float64).to(draw(dtypes)) for k in keys}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


@settings(max_examples=60, deadline=None)
@given(state_dicts())
def test_flatten_unflatten_round_trip(state: dict[str, torch.Tensor]) -> None:
    layout = ModelLayout.from_state_dict(state, "m")
    vec = layout.flatten(state)
    assert vec.dtype == np.float64 and vec.shape == (layout.size,)
    assert layout.size == sum(t.numel() for t in state.values())
    back = layout.unflatten(vec)
    assert _equal(state, back)
    # the layout itself survives JSON (it is shipped as a manifest)
    again = ModelLayout.model_validate_json(layout.model_dump_json())
    assert again == layout and again.fingerprint == layout.fingerprint


@settings(max_examples=40, deadline=None)
@given(state_dicts(), st.data())
def test_fingerprint_changes_with_any_shape_or_name(state: dict[str, torch.Tensor], data: st.DataObject) -> None:
    layout = ModelLayout.from_state_dict(state, "m")
    key = data.draw(st.sampled_from(list(state)))
    renamed = {(k + "_x" if k == key else k): v for k, v in state.items()}
    reshaped = {k: (torch.zeros(tuple(v.shape) + (2,), dtype=v.dtype) if k == key else v) for k, v in state.items()}
    retyped = {k: (v.to(torch.float64 if v.dtype == torch.float32 else torch.float32) if k == key else v) for k, v in state.items()}
    fingerprints = {
        ModelLayout.from_state_dict(s, "m").fingerprint for s in (state, renamed, reshaped, retyped)
    } | {ModelLayout.from_state_dict(state, "other-model").fingerprint}
    assert len(fingerprints) == 5
    # deterministic: the same state_dict (even with other values) gives the same fingerprint
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    assert ModelLayout.from_state_dict(zeros, "m").fingerprint == layout.fingerprint


def test_parameter_order_is_part_of_the_layout() -> None:
    a = {"w": torch.zeros(2), "b": torch.zeros(3)}
    b = {"b": torch.zeros(3), "w": torch.zeros(2)}
    la, lb = ModelLayout.from_state_dict(a, "m"), ModelLayout.from_state_dict(b, "m")
    assert la.fingerprint != lb.fingerprint
    with pytest.raises(LayoutMismatch):
        la.flatten(b)


def test_wrong_layout_is_refused() -> None:
    state = {"conv.weight": torch.randn(4, 3), "conv.bias": torch.randn(4)}
    layout = ModelLayout.from_state_dict(state, "m")
    layout.check(layout.fingerprint)  # ours passes
    other = ModelLayout.from_state_dict({"conv.weight": torch.randn(4, 2), "conv.bias": torch.randn(4)}, "m")
    with pytest.raises(LayoutMismatch) as info:
        layout.check(other.fingerprint)
    assert isinstance(info.value, FingerprintMismatch) and info.value.reason == "layout-fingerprint"
    with pytest.raises(LayoutMismatch):  # same names, other shape
        layout.flatten({"conv.weight": torch.randn(4, 2), "conv.bias": torch.randn(4)})
    with pytest.raises(LayoutMismatch):  # missing tensor
        layout.flatten({"conv.weight": torch.randn(4, 3)})
    with pytest.raises(LayoutMismatch):  # extra tensor
        layout.flatten({**state, "fc.weight": torch.randn(1)})
    with pytest.raises(LayoutMismatch):  # vector of the wrong length
        layout.unflatten(np.zeros(layout.size + 1))
    with pytest.raises(LayoutMismatch):
        layout.unflatten(np.zeros((1, layout.size)))


def test_non_float_tensors_are_refused() -> None:
    with pytest.raises(ValueError):
        ModelLayout.from_state_dict({"num_batches_tracked": torch.tensor(3)}, "m")


def test_offsets_are_contiguous() -> None:
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor(7.0), "c": torch.ones(0), "d": torch.full((2,), -1.0)}
    layout = ModelLayout.from_state_dict(state, "m")
    assert [e.offset for e in layout.entries] == [0, 6, 7, 7]
    np.testing.assert_array_equal(layout.flatten(state), [0, 1, 2, 3, 4, 5, 7, -1, -1])
