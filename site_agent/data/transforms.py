"""MONAI dictionary transforms that bring every supported format to the model's standard tensor.

Standard tensor: float32, channel first ``(1, H, W)`` in [0, 1] (DICOM windowing when the file
has one, else min-max per image: ``readers.read_standard_image``), the longest side resized to
the model's input size with the aspect ratio kept and the short side padded with zeros (black),
centred. Keeping the chain in one place guarantees training sites and evaluation see identically
prepared images. The input size is a parameter (the model preset's), never looked up here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, MapTransform, Resized, ScaleIntensityd, SpatialPadd

from fedmq.site_agent.data.readers import MultiFrame, read_standard_image

DEFAULT_IMAGE_SIZE = 28


INFO_SUFFIX = "_info"


class LoadMedicalImaged(MapTransform):
    """Replace a path under each key by the decoded ``(1, H, W)`` float32 tensor in [0, 1].

    MONAI's ``LoadImaged`` does not apply DICOM windowing or MONOCHROME1 inversion nor give the
    per-file reasons we report, hence this reader. ``<key>_info`` receives the ``ImageInfo``.
    """

    def __init__(self, keys: KeysCollection, multiframe: MultiFrame = "refuse") -> None:
        super().__init__(keys)
        self.multiframe = multiframe

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image, info = read_standard_image(Path(out[key]), multiframe=self.multiframe)
            out[key] = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
            out[f"{key}{INFO_SUFFIX}"] = info
        return out


class ClampIntensityd(MapTransform):
    """Guard the [0, 1] contract against interpolation round-off."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = out[key].clamp_(0.0, 1.0)
        return out


def standard_postprocess(
    keys: Sequence[str] = ("image",), image_size: int = DEFAULT_IMAGE_SIZE, scale: bool = True
) -> Compose:
    """(Scale,) resize keeping the aspect ratio, pad, and type a channel-first image; shared by
    file loading (already in [0, 1]: ``scale=False``) and the npz splits (min-max: ``scale=True``)."""
    return Compose(
        [
            *([ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)] if scale else []),
            # "area" averages source pixels: correct anti-aliasing for the large downscales of radiographs.
            # The longest side becomes image_size; a 1955x1841 radiograph is not squashed but padded.
            Resized(keys=keys, spatial_size=image_size, size_mode="longest", mode="area"),
            SpatialPadd(keys=keys, spatial_size=(image_size, image_size), mode="constant", value=0.0),
            ClampIntensityd(keys=keys),
            EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def standard_transforms(
    image_size: int = DEFAULT_IMAGE_SIZE, multiframe: MultiFrame = "refuse", keys: Sequence[str] = ("image",)
) -> Compose:
    """Full chain from a path to the standard tensor."""
    return Compose(
        [LoadMedicalImaged(keys=keys, multiframe=multiframe),
         *standard_postprocess(keys, image_size, scale=False).transforms]
    )
