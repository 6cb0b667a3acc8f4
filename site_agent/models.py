"""Model presets shared by all sites and the aggregator: same preset + seed gives bit-identical weights.

Only GroupNorm is used: BatchNorm mixes samples within a batch, which breaks per-sample
gradients (Opacus DP-SGD) and leaks batch statistics through the running buffers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import resnet18, resnet50
from torch import nn

logger = logging.getLogger(__name__)

Preset = Literal["small_cnn", "resnet18", "resnet50"]
GROUPS = 32  # ResNet widths (64..2048) are all multiples of 32


@dataclass(frozen=True)
class PresetInfo:
    input_size: int
    n_params: int
    description: str


PRESETS: dict[str, PresetInfo] = {
    "small_cnn": PresetInfo(28, 24_569, "4 MONAI conv blocks (GroupNorm) + global pooling + linear; CPU-friendly"),
    "resnet18": PresetInfo(28, 11_169_089, "MONAI ResNet-18, 2D, 3x3 stem without max-pool (MedMNIST-style), GroupNorm"),
    "resnet50": PresetInfo(28, 23_505_089, "MONAI ResNet-50, 2D, 3x3 stem without max-pool (MedMNIST-style), GroupNorm"),
}


class SmallCNN(nn.Module):
    """A compact binary classifier that trains in seconds per round on a CPU under DP-SGD."""

    def __init__(self, channels: tuple[int, ...] = (8, 16, 32, 64), groups: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        in_ch = 1
        for i, out_ch in enumerate(channels):
            blocks.append(
                Convolution(
                    spatial_dims=2,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    kernel_size=3,
                    strides=1 if i == 0 else 2,
                    act="relu",
                    norm=("group", {"num_groups": groups}),
                    bias=False,
                )
            )
            in_ch = out_ch
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def _build(preset: Preset) -> nn.Module:
    norm = ("group", {"num_groups": GROUPS})
    if preset == "small_cnn":
        return SmallCNN()
    common = dict(
        spatial_dims=2, n_input_channels=1, num_classes=1, conv1_t_size=3, conv1_t_stride=1, no_max_pool=True, norm=norm
    )
    if preset == "resnet18":
        return _groupnorm_only(resnet18(**common))
    if preset == "resnet50":
        return _groupnorm_only(resnet50(**common))
    raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")


def _groupnorm_only(model: nn.Module) -> nn.Module:
    """MONAI's ResNet (1.4-1.6) forgets to pass ``norm`` to its residual layers, so BatchNorm
    remains there; Opacus' fixer swaps each for an equivalent GroupNorm (deterministic init)."""
    from opacus.validators import ModuleValidator

    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        model = ModuleValidator.fix(model)
    return model


def build_model(preset: Preset, seed: int) -> nn.Module:
    """Build a preset with weights drawn from ``seed`` only, without disturbing the global RNG."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(preset)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise RuntimeError(f"preset {preset} unexpectedly contains BatchNorm")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
