"""Which torch device a site trains, clips, noises and evaluates on (``device`` setting).

Resolved once at start-up, before the privacy ledger is opened, so a site configured for a GPU
it does not have stops with a clear error instead of charging budget for a round it cannot run.
"""

from __future__ import annotations

import logging
import re

import torch

from fedmq.shared.errors import ConfigError

logger = logging.getLogger(__name__)

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def resolve_device(spec: str) -> torch.device:
    """``auto``: the first CUDA GPU when one is usable, else the CPU (the choice is logged).

    ``cuda``/``cuda:N`` without a usable CUDA device (or N out of range) raises ``ConfigError``.
    On CUDA, TF32 is allowed for matrix products and convolutions (about 8x the fp32 rate on
    Hopper; DP-SGD's clipping and noise dwarf its rounding).
    """
    if not re.fullmatch(DEVICE_PATTERN, spec):
        raise ConfigError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N")
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        device = torch.device("cuda:0") if available else torch.device("cpu")
        logger.info(
            "device auto: chose %s", device,
            extra={"device": str(device), "gpu": torch.cuda.get_device_name(device) if available else None},
        )
    else:
        if not available:
            raise ConfigError(
                f"device = {spec!r} but this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'}); set device = \"cpu\" or \"auto\""
            )
        device = torch.device(spec if ":" in spec else "cuda:0")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device = {spec!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


__all__ = ["DEVICE_PATTERN", "resolve_device"]
