"""Format readers that turn one file into a 2D float32 array in the modality's own units.

They only decode; scaling and resizing belong to the transform chain so that every format is
normalised the same way. Each refusal raises an ``ImageReadError`` with a reason an operator
can act on (which codec is missing, why a file is not an image...).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from site_agent.data.errors import ImageReadError, UnsupportedImage, UnsupportedTransferSyntax

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


def read_dicom(path: Path, multiframe: MultiFrame = "refuse") -> np.ndarray:
    """Decode a DICOM image with the modality LUT applied and MONOCHROME1 inverted.

    Files without the 128-byte preamble/file meta are accepted (``force=True``) because
    older modalities write them; whether they then hold a usable image is checked explicitly.
    """
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
    if photometric == "MONOCHROME1":
        # Low values mean bright in MONOCHROME1; mirror within the range so later min-max scaling sees MONOCHROME2.
        image = image.max() + image.min() - image
    return image


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
    """Read a 2D NIfTI or a 3D volume holding one slice; first array axis is taken as rows."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    where = str(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except FileNotFoundError as exc:
        raise ImageReadError(where, "file not found") from exc
    except (ImageFileError, OSError, ValueError, EOFError, Exception) as exc:  # gzip/zlib errors vary
        raise ImageReadError(where, f"not a readable NIfTI file: {exc}") from exc
    squeezed = data.reshape([s for s in data.shape if s != 1]) if data.ndim > 2 else data
    if squeezed.ndim != 2:
        raise UnsupportedImage(where, f"NIfTI shape {data.shape} is not 2D or a single-slice volume")
    return squeezed.astype(np.float32)


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
