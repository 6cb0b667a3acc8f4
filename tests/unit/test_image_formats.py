"""Issue 18, finding 3: one image in every format loads to the same tensor.

One non-square picture with an asymmetric mark (a transpose or a mirror cannot pass) is written
as DICOM MONOCHROME2 and MONOCHROME1, DICOM with a rescale slope/intercept, PNG 8 and 16 bit,
NIfTI from nibabel (RAS affine, and LPS with the data flipped to match), and NIfTI written by
MONAI's own ``LoadImage`` -> ``SaveImage``. Through the site loader every one must equal the
DICOM MONOCHROME2 tensor. Windowing and the kept aspect ratio are checked beside it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from fedmq.site_agent.data import standard_transforms

H, W, SIZE = 60, 44, 32


def _picture() -> np.ndarray:
    """0..255 grey levels: a horizontal ramp, a bright block top-left, a dark bar bottom-right."""
    img = np.tile(np.linspace(40, 200, W), (H, 1))
    img[5:20, 4:14] = 255
    img[45:55, 30:40] = 0
    return np.round(img).astype(np.uint16)


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", slope: float | None = None,
                intercept: float | None = None, window: tuple[float, float] | None = None,
                modality: str = "DX") -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined = modality, "CHEST"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(stored, dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _load(path: Path, size: int = SIZE) -> torch.Tensor:
    return standard_transforms(image_size=size)({"image": str(path)})["image"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("formats")
    pic = _picture()
    out = {
        "dicom-monochrome2": write_dicom(d / "m2.dcm", pic),
        "dicom-monochrome1": write_dicom(d / "m1.dcm", 255 - pic, photometric="MONOCHROME1"),
        # stored = (value - intercept) / slope: the loader must apply the modality LUT
        "dicom-rescaled": write_dicom(d / "rescaled.dcm", (pic.astype(np.int64) + 1024) // 1 * 1, slope=2.0,
                                      intercept=-2048.0),
    }
    Image.fromarray(pic.astype(np.uint8), mode="L").save(d / "p8.png")
    Image.fromarray((pic * 257).astype(np.uint16)).save(d / "p16.png")
    out["png-8bit"], out["png-16bit"] = d / "p8.png", d / "p16.png"
    # nibabel, the usual way: data[x, y] with x = column, y = row, RAS affine
    nib.save(nib.Nifti1Image(pic.T.astype(np.int16), np.eye(4)), str(d / "ras.nii.gz"))
    out["nifti-nibabel-ras"] = d / "ras.nii.gz"
    # the same picture stored LPS (x and y axes point the other way), data flipped to match
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:2, 3] = [W - 1, H - 1]
    nib.save(nib.Nifti1Image(pic.T[::-1, ::-1].astype(np.int16).copy(), lps), str(d / "lps.nii.gz"))
    out["nifti-nibabel-lps"] = d / "lps.nii.gz"
    # MONAI's own pipeline: LoadImage(PNG) -> SaveImage(NIfTI)
    from monai.transforms import LoadImage, SaveImage

    img = LoadImage(image_only=True, ensure_channel_first=True)(str(d / "p8.png"))
    SaveImage(output_dir=str(d / "monai"), output_ext=".nii.gz", separate_folder=False, output_postfix="saved",
              print_log=False)(img)
    out["nifti-monai-saveimage"] = next((d / "monai").glob("*.nii.gz"))
    return out


def test_every_format_loads_to_the_same_tensor(files):
    reference = _load(files["dicom-monochrome2"])
    # and the reference is the picture itself: min-max, longest side 32, padded (not squashed)
    pic = _picture().astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy((pic - pic.min()) / (pic.max() - pic.min()))[None, None],
                                               size=(32, 23), mode="area")[0]
    assert torch.allclose(reference[:, :, 4:27], expected, atol=1e-5)  # 9 columns of padding, 4 left / 5 right
    assert float(reference[:, :, :4].abs().max()) == 0.0 and float(reference[:, :, 27:].abs().max()) == 0.0
    diffs = {name: float((_load(path) - reference).abs().max()) for name, path in files.items()}
    assert all(d < 1e-5 for d in diffs.values()), diffs


def test_dicom_window_is_applied_and_monochrome1_inverted_after_it(tmp_path):
    from fedmq.site_agent.data.readers import read_standard_image

    values = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (20, 1))  # 0..990 along each row
    m2 = write_dicom(tmp_path / "w2.dcm", values, window=(500.0, 201.0))
    img, info = read_standard_image(m2)
    assert info.intensity == "window" and info.modality == "DX" and info.body_part == "CHEST"
    x = values.astype(np.float64)
    expected = np.clip((x - (500 - 0.5)) / 200.0 + 0.5, 0, 1)  # DICOM LINEAR window
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert img[0, 0] == 0.0 and img[0, -1] == 1.0 and 0 < img[0, 50] < 1
    m1 = write_dicom(tmp_path / "w1.dcm", values, window=(500.0, 201.0), photometric="MONOCHROME1")
    np.testing.assert_allclose(read_standard_image(m1)[0], 1.0 - expected, atol=1e-6)
    # without a window: min-max per image (the documented fallback)
    plain, info = read_standard_image(write_dicom(tmp_path / "plain.dcm", values))
    assert info.intensity == "min-max" and plain.min() == 0.0 and plain.max() == 1.0


def test_aspect_ratio_is_kept_with_padding(tmp_path):
    wide = np.zeros((20, 80), dtype=np.uint8)
    wide[:, :40] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    x = _load(tmp_path / "wide.png", size=40)[0]
    assert tuple(x.shape) == (40, 40)
    assert float(x[:15].max()) == 0.0 and float(x[25:].max()) == 0.0  # 10 rows of image, centred
    assert float(x[15:25, :20].min()) == 1.0 and float(x[15:25, 20:].max()) == 0.0
