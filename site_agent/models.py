"""Model presets shared by all sites and the aggregator: same preset + seed gives bit-identical weights.

This module is the one registry of presets: the input size a preset expects, its parameter
count and the physical batch it trains at on a GPU by default all live in ``PRESETS``; the
site settings, the data loaders' resize and the GPU benchmark read them from here.

Every preset trains under DP-SGD:
- only GroupNorm: BatchNorm mixes samples within a batch, which breaks per-sample gradients and
  leaks batch statistics through its running buffers;
- residual adds are out of place and activations are not in place: per-sample-gradient hooks
  (Opacus' and fedmq's own) keep references to layer outputs, and an in-place op on a view that
  a backward hook returned is refused by autograd ("Output 0 of BackwardHookFunction is a view
  and is being modified inplace").

``scatternet`` is a fixed wavelet scattering front end (site_agent/scattering.py, no trained
weights) under a GroupNorm and a linear classifier: the preset for small datasets at a small
privacy budget (Tramer & Boneh 2021), and the demo's.

The ``*_224`` presets are the standard ImageNet-shaped ResNets (7x7 stride-2 stem, 3x3 max-pool)
with one input channel, for full-resolution radiographs; the 28 px presets keep a 3x3 stride-1
stem without max-pool (MedMNIST-style).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from monai.networks.blocks import Convolution
from torch import nn

from fedmq.shared.errors import ConfigError
from fedmq.site_agent.scattering import FrontendCache, Scattering2D

logger = logging.getLogger(__name__)

Preset = Literal["small_cnn", "scatternet", "resnet18", "resnet50", "resnet18_224", "resnet50_224"]
GROUPS = 32  # ResNet widths (64..2048) are all multiples of 32
_NORM = ("group", {"num_groups": GROUPS})
_ACT = ("relu", {"inplace": False})


@dataclass(frozen=True)
class PresetInfo:
    #: square input side in pixels; images are resized to it (site_agent.data) and a site whose
    #: ``image_size`` setting says otherwise is refused
    input_size: int
    n_params: int
    description: str
    #: DP-SGD micro-batch used when ``max_physical_batch`` is unset (bounds GPU memory; the
    #: Poisson logical batch is split into chunks of at most this many images). Rule for the
    #: 224 px presets: the largest power of two whose DP step (engine ``bk``) stays within 12 GiB,
    #: three quarters of a 16 GiB card, the smallest hospital GPU we plan for. On an H200 a DP step
    #: of resnet50_224 is bound by kernel launches, not by the GPU, so larger micro-batches are
    #: nearly free: 128 (11.4 GiB) gives DP / plain 0.39 and a DP round 1.20x plain, against 0.31
    #: and 1.72x at 32 (docs/benchmarks.md, "Site training on a GPU")
    physical_batch: int = 256


PRESETS: dict[str, PresetInfo] = {
    "small_cnn": PresetInfo(28, 24_569, "4 MONAI conv blocks (GroupNorm) + global pooling + linear; CPU-friendly", 512),
    "scatternet": PresetInfo(
        28, 4_132, "fixed Morlet scattering (2 scales, 8 angles: 81 x 7 x 7, no trained weights) + GroupNorm + linear; "
        "for small data under DP (Tramer & Boneh 2021)", 512),
    "resnet18": PresetInfo(28, 11_169_089, "MONAI ResNet-18, 2D, 3x3 stem without max-pool (MedMNIST-style), GroupNorm", 256),
    "resnet50": PresetInfo(28, 23_505_089, "MONAI ResNet-50, 2D, 3x3 stem without max-pool (MedMNIST-style), GroupNorm", 256),
    "resnet18_224": PresetInfo(224, 11_171_649, "MONAI ResNet-18, 2D, 7x7 stride-2 stem + max-pool, 224 px, 1 channel, GroupNorm", 128),
    "resnet50_224": PresetInfo(224, 23_507_649, "MONAI ResNet-50, 2D, 7x7 stride-2 stem + max-pool, 224 px, 1 channel, GroupNorm", 128),
}
assert set(PRESETS) == set(get_args(Preset)), "Preset literal and PRESETS registry disagree"


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
                    act=_ACT,
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


class ScatterNet(nn.Module):
    """Scattering features (fixed) -> GroupNorm -> linear: only the last two are trained and sent.

    GroupNorm normalises each image's features by itself (no statistics shared across images or
    learned from data), as Tramer & Boneh do for scattering features under DP; 9 groups of 9 of
    the 81 channels.
    """

    def __init__(self, size: int = 28, groups: int = 9) -> None:
        super().__init__()
        self.frontend = Scattering2D(size)
        k = self.frontend.channels
        self.classifier = nn.Sequential(nn.GroupNorm(groups, k), nn.Flatten(), nn.Linear(k * self.frontend.out_size**2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.frontend(x))


#: a fixed front end's features of whole datasets, per process (site_agent/scattering.py)
_FRONTEND_FEATURES = FrontendCache()


def trained_part(model: nn.Module, X: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """What training and evaluation run for images ``X``: for a model with a fixed front end
    (``frontend`` and ``classifier``), the classifier and the front end's features of X, computed
    once per dataset; for any other model, the model and X. Same outputs as ``model(X)``."""
    frontend, classifier = getattr(model, "frontend", None), getattr(model, "classifier", None)
    if frontend is None or classifier is None:
        return model, X
    if next(frontend.parameters(), None) is not None:
        raise RuntimeError("a fixed front end must have no parameters")
    return classifier, _FRONTEND_FEATURES.features(frontend, X)


class _DPBasicBlock(ResNetBlock):
    """MONAI's basic block with GroupNorm, a ReLU that is not in place and an out-of-place residual add."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["norm"] = _NORM
        kwargs["act"] = _ACT
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.act(out + residual)


class _DPBottleneck(ResNetBottleneck):
    """MONAI's bottleneck block with GroupNorm, a ReLU that is not in place and an out-of-place residual add."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["norm"] = _NORM
        kwargs["act"] = _ACT
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.act(out + residual)


def _resnet(block: type[nn.Module], layers: list[int], full_resolution: bool) -> nn.Module:
    stem = dict(conv1_t_size=7, conv1_t_stride=2, no_max_pool=False) if full_resolution else dict(
        conv1_t_size=3, conv1_t_stride=1, no_max_pool=True
    )
    model = ResNet(
        block=block,  # type: ignore[arg-type]
        layers=layers,
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=1,
        num_classes=1,
        act=_ACT,
        norm=_NORM,
        **stem,  # type: ignore[arg-type]
    )
    return _groupnorm_only(model)


def _build(preset: Preset) -> nn.Module:
    if preset == "small_cnn":
        return SmallCNN()
    if preset == "scatternet":
        return ScatterNet(PRESETS[preset].input_size)
    depth, _, size = preset.partition("_")
    full = size == "224"
    if depth == "resnet18":
        return _resnet(_DPBasicBlock, [2, 2, 2, 2], full)
    if depth == "resnet50":
        return _resnet(_DPBottleneck, [3, 4, 6, 3], full)
    raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")


def _groupnorm_only(model: nn.Module) -> nn.Module:
    """MONAI's ResNet (1.4-1.6) forgets to pass ``norm`` to its downsample shortcuts, so BatchNorm
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
    inplace = [n for n, m in model.named_modules() if getattr(m, "inplace", False)]
    if inplace:
        raise RuntimeError(f"preset {preset} has in-place modules {inplace[:3]}: per-sample gradients would break")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_image_size(preset: str, image_size: int | None) -> int:
    """The input size a site trains at: the preset's; a different explicit setting is refused."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    expected = PRESETS[preset].input_size
    if image_size is not None and image_size != expected:
        raise ConfigError(
            f"image_size = {image_size} does not match model_preset {preset!r}, which expects {expected} px "
            f"(remove image_size, or pick a preset of that size: "
            f"{sorted(p for p, i in PRESETS.items() if i.input_size == image_size) or 'none'})"
        )
    return expected


# ---------------------------------------------------------------------------------------- init weights
#: BatchNorm buffers a torchvision / MONAI checkpoint carries that GroupNorm has no place for
_DROPPED_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_HEAD_KEYS = ("fc.weight", "fc.bias", "head.weight", "head.bias")
_PREFIXES = ("module.", "_module.", "model.")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"init_weights {path} not found") from None
    except Exception as exc:  # torch raises many types for a file that is not a tensor archive
        raise ConfigError(f"init_weights {path} is not a readable torch state dict: {exc}") from None
    if isinstance(raw, Mapping) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(raw.get(key), Mapping):
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"init_weights {path} holds no state dict (a mapping of names to tensors)")
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def map_init_weights(model: nn.Module, source: Mapping[str, torch.Tensor], origin: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a torchvision or MONAI ResNet state dict onto ``model``'s names and shapes.

    Rules (docs/deployment.md): equal names and shapes are copied; BatchNorm weight/bias go to the
    GroupNorm in the same place (same shape); BatchNorm running statistics are dropped; an RGB stem
    (C_out, 3, k, k) becomes one channel by summing over colours (a grey image replicated to RGB
    gives the same activations); a classification head of another class count (ImageNet's 1000)
    keeps the preset's seeded init. Any other shape that does not fit is refused, naming both.
    Returns the state to load and the names left at their seeded init.
    """
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in source.items():
        if key.endswith(_DROPPED_SUFFIXES):
            continue
        if key not in target:
            problems.append(f"{key}: {tuple(value.shape)} in {origin} has no place in the preset")
            continue
        want = target[key]
        if not torch.is_floating_point(value):
            problems.append(f"{key}: {value.dtype} in {origin} is not floating point")
            continue
        if tuple(value.shape) == tuple(want.shape):
            mapped[key] = value.to(want.dtype)
        elif key == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3 and tuple(want.shape) == (value.shape[0], 1, *value.shape[2:]):
            mapped[key] = value.sum(dim=1, keepdim=True).to(want.dtype)
        elif key in _HEAD_KEYS:
            continue  # another class count: fine-tuning starts from a fresh head
        else:
            problems.append(f"{key}: shape {tuple(value.shape)} in {origin} does not fit the preset's {tuple(want.shape)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"init_weights {origin} does not fit this preset: {shown}")
    body = [k for k in target if k not in _HEAD_KEYS]
    if not any(k in mapped for k in body):
        raise ConfigError(f"init_weights {origin} shares no parameter with this preset")
    left = [k for k in target if k not in mapped]
    return mapped, left


def load_init_weights(model: nn.Module, path: Path | str, preset: str) -> list[str]:
    """Load ``path`` into ``model`` in place (see ``map_init_weights``); returns names left at their init."""
    path = Path(path)
    mapped, left = map_init_weights(model, _read_state_dict(path), f"{path} (for preset {preset!r})")
    state = model.state_dict()
    state.update(mapped)
    model.load_state_dict(state, strict=True)
    logger.info("init weights loaded", extra={"path": str(path), "mapped": len(mapped), "left_at_init": left[:8]})
    return left
