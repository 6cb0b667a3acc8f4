"""Model presets: sizes, GroupNorm only (Opacus-compatible), identical weights for identical seeds."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from fedmq.site_agent.models import PRESETS, build_model, count_parameters


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset_and_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, build_model(request.param, seed=0)


def test_param_counts_match_presets(preset_and_model: tuple[str, nn.Module]) -> None:
    preset, model = preset_and_model
    assert count_parameters(model) == PRESETS[preset].n_params


def test_small_cnn_is_small() -> None:
    assert 20_000 <= PRESETS["small_cnn"].n_params <= 30_000


def test_groupnorm_only_and_opacus_valid(preset_and_model: tuple[str, nn.Module]) -> None:
    _, model = preset_and_model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


def test_single_logit(preset_and_model: tuple[str, nn.Module]) -> None:
    preset, model = preset_and_model
    size = PRESETS[preset].input_size
    with torch.no_grad():
        out = model.eval()(torch.rand(3, 1, size, size))
    assert out.shape == (3, 1)


@pytest.mark.parametrize("preset", ["small_cnn", "resnet18"])
def test_same_seed_same_weights(preset: str) -> None:
    a, b, c = build_model(preset, 1), build_model(preset, 1), build_model(preset, 2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model("small_cnn", 5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("vgg", 0)  # type: ignore[arg-type]
