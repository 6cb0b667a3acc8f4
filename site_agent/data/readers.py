"""Format readers that turn one file into a 2D float32 array, rows top to bottom.

``read_image`` decodes in the modality's own units; ``read_standard_image`` also applies the
one intensity rule of every format (docs/preparing-data.md), returning [0, 1] grey levels:

- DICOM with a VOI LUT Sequence or Window Center/Width: the first VOI LUT or window is applied
  (as a PACS viewer shows the image), then MONOCHROME1 is inverted;
- anything else (DICOM without windowing, PNG, NIfTI): min-max scaled per image (constant
  images become zeros);
- NIfTI is first brought through its affine into RAS+ (as ``nib.as_closest_canonical``); its first
  axis is then the image's columns (left to right) and its second the rows (top to bottom), the
  convention of MONAI's ``LoadImage``/``SaveImage``.

Each refusal raises an ``ImageReadError`` with a reason an operator can act on (which codec is
missing, why a file is not an image...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedmq.site_agent.data.errors import ImageReadError, UnsupportedImage, UnsupportedTransferSyntax

logger = logging.getLogger(__name__)

MultiFrame = Literal["refuse", "first"]
ImageFormat = Literal["dicom", "png", "nifti"]

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
PNG_SUFFIXES = {".png"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}


def detect_format(path: Path) -> ImageFormat:
    """Pick a reader by file name; extension-less files are treated as DICOM as PACS exports often are."""
    name = path.name.lower()
    if name.endswith(".nii.gz") or name.endswith(".nii"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix in PNG_SUFFIXES:
        return "png"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    raise UnsupportedImage(str(path), f"unknown file type {suffix!r} (expected .dcm, .png, .nii or .nii.gz)")


def _decoder_available(transfer_syntax: object) -> tuple[bool, str]:
    """Ask pydicom whether some installed plugin can decode this transfer syntax."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(transfer_syntax)  # type: ignore[arg-type]
    except NotImplementedError:
        return False, "pydicom has no decoder for it"
    if decoder.is_available:
        return True, ""
    missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
    return False, f"no decoder installed ({missing})"


@dataclass(frozen=True)
class ImageInfo:
    """What ``fedmq site check-data`` reports about one file (no pixel data, no identifiers)."""

    format: ImageFormat
    rows: int
    columns: int
    modality: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    #: how intensities were brought to [0, 1]: "voi-lut", "window", or "min-max"
    intensity: str = "min-max"


def read_dicom(path: Path, multiframe: MultiFrame = "refuse") -> np.ndarray:
    """Decode a DICOM image with the modality LUT applied and MONOCHROME1 inverted.

    Files without the 128-byte preamble/file meta are accepted (``force=True``) because
    older modalities write them; whether they then hold a usable image is checked explicitly.
    """
    image, ds = _read_dicom(path, multiframe)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        # Low values mean bright in MONOCHROME1; mirror within the range so min-max scaling sees MONOCHROME2.
        image = image.max() + image.min() - image
    return image


def _read_dicom(path: Path, multiframe: MultiFrame = "refuse") -> tuple[np.ndarray, Any]:
    """Modality-LUT values (MONOCHROME1 not yet inverted) and the dataset they came from."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    where = str(path)
    try:
        ds = pydicom.dcmread(path, force=True)
    except FileNotFoundError as exc:
        raise ImageReadError(where, "file not found") from exc
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise ImageReadError(where, f"not a readable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        raise ImageReadError(where, "DICOM file has no Pixel Data element (not an image, or not DICOM at all)")
    for keyword in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword not in ds:
            raise ImageReadError(where, f"DICOM image lacks the required {keyword} element")

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        # No file meta: the encoding pydicom detected while parsing is the only evidence we have.
        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
        logger.debug("%s: no file meta, assuming %s", where, syntax.name)
    syntax = UID(str(syntax))
    ok, why = _decoder_available(syntax)
    if not ok:
        raise UnsupportedTransferSyntax(where, f"unsupported transfer syntax {syntax} ({syntax.name}): {why}")

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and multiframe == "refuse":
        raise UnsupportedImage(
            where, f"multi-frame image with {frames} frames refused (use multiframe='first' to take frame 1)"
        )
    photometric = str(ds.PhotometricInterpretation).upper()
    if photometric == "PALETTE COLOR":
        raise UnsupportedImage(where, "PALETTE COLOR images are not supported")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises a wide range of types for corrupt pixel data
        raise ImageReadError(where, f"cannot decode pixel data: {exc}") from exc
    if frames > 1:
        pixels = pixels[0]
    samples = int(ds.SamplesPerPixel)
    if samples == 3:
        # pydicom converts YBR to RGB by default, so ITU-R 601 luma gives the grey level.
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif samples != 1:
        raise UnsupportedImage(where, f"{samples} samples per pixel not supported")
    else:
        pixels = apply_modality_lut(pixels, ds)
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim != 2:
        raise UnsupportedImage(where, f"decoded pixel array has shape {image.shape}, expected 2D")
    return image, ds


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued (several presets): the first is the default view."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def dicom_to_unit(image: np.ndarray, ds: Any, where: str = "") -> tuple[np.ndarray, str]:
    """[0, 1] grey levels from modality values: the VOI LUT or window when present, else min-max.

    DICOM PS3.3 C.11.2.1.2: LINEAR ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped, LINEAR_EXACT
    ``(x - c) / w + 0.5``, SIGMOID ``1 / (1 + exp(-4 (x - c) / w))``. MONOCHROME1 is inverted after."""
    how = "min-max"
    out: np.ndarray | None = None
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        from pydicom.pixels import apply_voi_lut

        item = ds.VOILUTSequence[0]
        try:
            bits = int(item.LUTDescriptor[2])
            lut = apply_voi_lut(image.astype(np.float64), ds, index=0, prefer_lut=True)
            out, how = np.clip(np.asarray(lut, dtype=np.float64) / float((1 << bits) - 1), 0.0, 1.0), "voi-lut"
        except Exception as exc:  # a malformed VOI LUT: fall back to the window or min-max, and say so
            logger.warning("%s: VOI LUT unusable (%s); falling back", where, exc)
    if out is None and "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError):
            c, w = 0.0, 0.0
        func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        x = image.astype(np.float64)
        if w >= 1.0 and func == "SIGMOID":
            out, how = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)), "window"
        elif w > 0.0 and func == "LINEAR_EXACT":
            out, how = np.clip((x - c) / w + 0.5, 0.0, 1.0), "window"
        elif w > 1.0:
            out, how = np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0), "window"
        else:
            logger.warning("%s: window width %r unusable; min-max scaling instead", where, w)
    if out is None:
        out = min_max(image.astype(np.float64))
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32), how


def min_max(image: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1]; a constant image becomes zeros."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - lo) / (hi - lo)).astype(np.float32)


def read_png(path: Path) -> np.ndarray:
    """Decode a PNG as grey levels, keeping 16-bit precision and collapsing colour to luminance."""
    from PIL import Image, UnidentifiedImageError

    where = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in {"I;16", "I;16B", "I;16L", "I", "F", "L"}:
                array = np.array(img)
            else:
                array = np.array(img.convert("L"))
    except FileNotFoundError as exc:
        raise ImageReadError(where, "file not found") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(where, f"not a readable PNG: {exc}") from exc
    if array.ndim != 2:
        raise UnsupportedImage(where, f"PNG decoded to shape {array.shape}, expected 2D")
    return array.astype(np.float32)


def read_nifti(path: Path) -> np.ndarray:
    """Read a 2D NIfTI or a 3D volume holding one slice, through its affine.

    The image is reoriented to RAS+ (as ``nib.as_closest_canonical``), so two files holding the same
    picture under different affines (RAS, LPS, flipped axes) load identically. The remaining
    first axis is the image's columns and the second its rows (MONAI's convention: a PNG loaded
    by ``LoadImage`` and written by ``SaveImage`` keeps its orientation)."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    where = str(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        while data.ndim < 3:  # a 2D NIfTI still has a 3D affine
            data = data[..., None]
        if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
            data = data.reshape(data.shape[:3])
        if data.ndim == 3:
            data = nib.orientations.apply_orientation(data, nib.orientations.io_orientation(img.affine))
    except FileNotFoundError as exc:
        raise ImageReadError(where, "file not found") from exc
    except (ImageFileError, OSError, ValueError, EOFError, Exception) as exc:  # gzip/zlib errors vary
        raise ImageReadError(where, f"not a readable NIfTI file: {exc}") from exc
    squeezed = data.reshape([s for s in data.shape if s != 1]) if data.ndim > 2 else data
    if squeezed.ndim != 2:
        raise UnsupportedImage(where, f"NIfTI shape {data.shape} is not 2D or a single-slice volume")
    return np.ascontiguousarray(squeezed.T, dtype=np.float32)  # (x, y) -> (rows, columns)


def read_standard_image(path: Path, multiframe: MultiFrame = "refuse") -> tuple[np.ndarray, ImageInfo]:
    """The image in [0, 1] grey levels by the intensity rule of its format, and what it was."""
    fmt = detect_format(path)
    if not path.exists():
        raise ImageReadError(str(path), "file not found")
    if fmt == "dicom":
        raw, ds = _read_dicom(path, multiframe=multiframe)
        _check_finite(path, raw)
        image, how = dicom_to_unit(raw, ds, str(path))
        info = ImageInfo("dicom", int(raw.shape[0]), int(raw.shape[1]),
                         modality=str(ds.get("Modality", "") or "") or None,
                         body_part=str(ds.get("BodyPartExamined", "") or "").upper() or None,
                         photometric=str(ds.PhotometricInterpretation).upper(), intensity=how)
        return image, info
    raw = read_png(path) if fmt == "png" else read_nifti(path)
    _check_finite(path, raw)
    return min_max(raw.astype(np.float64)), ImageInfo(fmt, int(raw.shape[0]), int(raw.shape[1]))


def _check_finite(path: Path, image: np.ndarray) -> None:
    if not np.isfinite(image).all():
        raise ImageReadError(str(path), "image contains NaN or infinite values")
    if min(image.shape) < 1:
        raise ImageReadError(str(path), f"empty image of shape {image.shape}")


def read_image(path: Path, multiframe: MultiFrame = "refuse") -> np.ndarray:
    """Dispatch on file type; every failure surfaces as ``ImageReadError``."""
    fmt = detect_format(path)
    if not path.exists():
        raise ImageReadError(str(path), "file not found")
    if fmt == "dicom":
        image = read_dicom(path, multiframe=multiframe)
    elif fmt == "png":
        image = read_png(path)
    else:
        image = read_nifti(path)
    if not np.isfinite(image).all():
        raise ImageReadError(str(path), "image contains NaN or infinite values")
    if min(image.shape) < 1:
        raise ImageReadError(str(path), f"empty image of shape {image.shape}")
    return image
