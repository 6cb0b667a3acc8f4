"""MONAI dictionary transforms that bring every supported format to the model's standard tensor.

Standard tensor: float32, channel first ``(1, H, W)``, min-max scaled to [0, 1] per image
(constant images become all zeros), resized to the model's input size. Keeping the chain in
one place guarantees training sites and evaluation see identically prepared images.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, MapTransform, Resized, ScaleIntensityd

from site_agent.data.readers import MultiFrame, read_image

DEFAULT_IMAGE_SIZE = 28


class LoadMedicalImaged(MapTransform):
    """Replace a path under each key by the decoded ``(1, H, W)`` float32 tensor.

    MONAI's ``LoadImaged`` does not apply MONOCHROME1 inversion nor give the per-file
    reasons we report, hence this reader.
    """

    def __init__(self, keys: KeysCollection, multiframe: MultiFrame = "refuse") -> None:
        super().__init__(keys)
        self.multiframe = multiframe

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = read_image(Path(out[key]), multiframe=self.multiframe)
            out[key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        return out


class ClampIntensityd(MapTransform):
    """Guard the [0, 1] contract against interpolation round-off."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = out[key].clamp_(0.0, 1.0)
        return out


def standard_postprocess(keys: Sequence[str] = ("image",), image_size: int = DEFAULT_IMAGE_SIZE) -> Compose:
    """Scale, resize and type a channel-first image; shared by file loading and the npz splits."""
    return Compose(
        [
            ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0),
            # "area" averages source pixels: correct anti-aliasing for the large downscales of radiographs.
            Resized(keys=keys, spatial_size=(image_size, image_size), mode="area"),
            ClampIntensityd(keys=keys),
            EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def standard_transforms(
    image_size: int = DEFAULT_IMAGE_SIZE, multiframe: MultiFrame = "refuse", keys: Sequence[str] = ("image",)
) -> Compose:
    """Full chain from a path to the standard tensor."""
    return Compose(
        [LoadMedicalImaged(keys=keys, multiframe=multiframe), *standard_postprocess(keys, image_size).transforms]
    )
