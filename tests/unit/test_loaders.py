"""Loaders on real DICOM/PNG/NIfTI files: one standard tensor, and bad files reported, not fatal."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from fedmq.site_agent.data import ImageCache, ManifestError, load_dataset, read_manifest, standard_transforms
from fedmq.site_agent.data import readers
from fedmq.site_agent.data.errors import ImageReadError, UnsupportedImage, UnsupportedTransferSyntax
from fedmq.site_agent.data.readers import read_dicom


def _testfile(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (pydicom-data missing?)")
    return Path(path)


def _std(path: Path, size: int = 28, **kw) -> torch.Tensor:
    return standard_transforms(image_size=size, **kw)({"image": str(path)})["image"]


def _assert_standard(x: torch.Tensor, size: int = 28) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (1, size, size)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_ct_small_applies_rescale_slope_intercept() -> None:
    path = _testfile("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert float(ds.RescaleIntercept) == -1024.0
    decoded = read_dicom(path)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(decoded, expected)
    x = _std(path)
    _assert_standard(x)
    assert float(x.max()) > 0.5


def test_monochrome1_radiograph_is_inverted() -> None:
    path = _testfile("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = ds.pixel_array.astype(np.float32)
    decoded = read_dicom(path)
    np.testing.assert_allclose(decoded, raw.max() + raw.min() - raw)

    x = _std(path)[0].numpy()
    _assert_standard(torch.from_numpy(x)[None])
    # 1955 x 1841: the aspect ratio is kept (28 x 26) and the two spare columns padded black
    assert ds.Rows == 1955 and ds.Columns == 1841
    assert np.all(x[:, 0] == 0) and np.all(x[:, -1] == 0) and x[:, 1:-1].min() < x[:, 1:-1].max()
    body = x[:, 1:-1]
    lung, mediastinum = np.s_[5:11, 5:9], np.s_[5:11, 11:14]
    # Displayed correctly, aerated lung is darker than the mediastinum...
    assert body[lung].mean() < body[mediastinum].mean() - 0.2
    # ...while the raw MONOCHROME1 values have it the other way round.
    raw_small = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(raw)[None, None], (28, 26))[0, 0].numpy()
    assert raw_small[lung].mean() > raw_small[mediastinum].mean()
    assert np.corrcoef(body.ravel(), raw_small.ravel())[0, 1] < -0.95


def test_jpeg2000_radiograph_decodes_or_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    path = _testfile("RG1_J2KR.dcm")
    available, _ = readers._decoder_available(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if available:  # Pillow with OpenJPEG decodes it: must match the uncompressed original
        np.testing.assert_allclose(_std(path).numpy(), _std(_testfile("RG1_UNCI.dcm")).numpy(), atol=0.02)
    monkeypatch.setattr(readers, "_decoder_available", lambda syntax: (False, "no decoder installed (test)"))
    with pytest.raises(UnsupportedTransferSyntax, match="unsupported transfer syntax 1.2.840.10008.1.2.4.90"):
        read_dicom(path)


def test_jpeg_ls_without_decoder_is_unsupported_transfer_syntax() -> None:
    path = _testfile("MR_small_jpeg_ls_lossless.dcm")
    ok, _ = readers._decoder_available(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    if ok:
        pytest.skip("a JPEG-LS decoder is installed here")
    with pytest.raises(UnsupportedTransferSyntax, match="JPEG-LS"):
        read_dicom(path)


def test_multiframe_refused_unless_first_frame_requested() -> None:
    path = _testfile("emri_small.dcm")
    with pytest.raises(UnsupportedImage, match="multi-frame"):
        read_dicom(path)
    first = read_dicom(path, multiframe="first")
    np.testing.assert_allclose(first, pydicom.dcmread(path).pixel_array[0].astype(np.float32))
    _assert_standard(_std(path, multiframe="first"))


@pytest.mark.parametrize(
    ("name", "reason"),
    [("MR_truncated.dcm", "cannot decode pixel data"), ("no_meta.dcm", "no Pixel Data")],
)
def test_broken_dicoms_give_reasons(name: str, reason: str) -> None:
    with pytest.raises(ImageReadError, match=reason):
        read_dicom(_testfile(name))


def test_png_rgb_is_grayscale_and_16bit_kept(tmp_path: Path) -> None:
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[:, 15:, 0] = 255  # right half pure red
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    x = _std(tmp_path / "rgb.png")
    _assert_standard(x)
    # 40 x 30 -> 28 x 21, centred: columns 3..23 hold the image, the rest is black padding
    assert float(x[0, :, :12].max()) == 0.0 and float(x[0, :, 15:23].min()) == 1.0
    assert float(x[0, :, 25:].max()) == 0.0

    deep = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(readers.read_png(tmp_path / "deep.png"), deep.astype(np.float32))
    x = _std(tmp_path / "deep.png")
    _assert_standard(x)
    assert float(x.min()) < 0.05 and float(x.max()) > 0.95


def test_constant_image_becomes_zeros(tmp_path: Path) -> None:
    Image.fromarray(np.full((28, 28), 77, dtype=np.uint8)).save(tmp_path / "flat.png")
    x = _std(tmp_path / "flat.png")
    _assert_standard(x)
    assert torch.count_nonzero(x) == 0


def test_nifti_2d_and_single_slice_3d(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 255, size=(28, 28)).astype(np.uint8)
    # NIfTI's first axis is x (the image's columns), the second y (rows): the array is img.T
    nib.save(nib.Nifti1Image(img.T.copy(), np.eye(4)), str(tmp_path / "a.nii.gz"))
    nib.save(nib.Nifti1Image(img.T[:, :, None].astype(np.int16), np.eye(4)), str(tmp_path / "b.nii"))
    a, b = _std(tmp_path / "a.nii.gz"), _std(tmp_path / "b.nii")
    _assert_standard(a)
    expected = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_allclose(a[0].numpy(), expected, atol=1e-6)
    torch.testing.assert_close(a, b)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), dtype=np.uint8), np.eye(4)), str(tmp_path / "vol.nii.gz"))
    with pytest.raises(UnsupportedImage, match="single-slice"):
        readers.read_nifti(tmp_path / "vol.nii.gz")


def test_resize_to_other_input_size(tmp_path: Path) -> None:
    _assert_standard(_std(_testfile("CT_small.dcm"), size=64), size=64)


def test_dataset_skips_bad_files_and_keeps_good_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    files = tmp_path / "images"
    files.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_truncated.dcm", "no_meta.dcm", "RG1_J2KR.dcm"):
        os.symlink(_testfile(name), files / name)
    (files / "noise.dcm").write_bytes(np.random.default_rng(1).bytes(4096))
    (files / "noise.png").write_bytes(np.random.default_rng(2).bytes(512))
    Image.fromarray(np.eye(28, dtype=np.uint8) * 200).save(files / "ok.png")
    nib.save(nib.Nifti1Image(np.eye(28, dtype=np.uint8), np.eye(4)), str(files / "ok.nii.gz"))
    rows = [
        ("CT_small.dcm", 1), ("MR_small.dcm", 0), ("ok.png", 1), ("ok.nii.gz", 0),
        ("MR_truncated.dcm", 1), ("no_meta.dcm", 0), ("RG1_J2KR.dcm", 1),
        ("noise.dcm", 0), ("noise.png", 1), ("missing.dcm", 0),
    ]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"images/{p},{lab}\n" for p, lab in rows))
    monkeypatch.setattr(readers, "_decoder_available", lambda syntax: (
        (False, "no decoder installed (test)") if str(syntax) == "1.2.840.10008.1.2.4.90" else (True, "")
    ))
    with caplog.at_level("WARNING"):
        ds = load_dataset(manifest, image_size=28, split="train")
    assert len(ds) == 4 and ds.paths == ["images/CT_small.dcm", "images/MR_small.dcm", "images/ok.png", "images/ok.nii.gz"]
    assert ds.y.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert ds.X.shape == (4, 1, 28, 28) and ds.X.dtype == torch.float32
    reasons = dict(ds.skipped)
    assert set(reasons) == {f"images/{p}" for p, _ in rows[4:]}
    assert "transfer syntax" in reasons["images/RG1_J2KR.dcm"]
    assert "not found" in reasons["images/missing.dcm"]
    assert "PNG" in reasons["images/noise.png"]
    assert all(reasons.values())
    assert "skipped 6 unreadable of 10" in caplog.text


def test_cache_reuses_decoded_images(tmp_path: Path) -> None:
    Image.fromarray(np.eye(28, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("path,label,split\na.png,1,val\n")
    cache = ImageCache()
    first = load_dataset(tmp_path / "m.csv", split="val", cache=cache)
    assert len(cache) == 1
    second = load_dataset(tmp_path / "m.csv", split="val", cache=cache)
    torch.testing.assert_close(first.X, second.X)
    assert len(load_dataset(tmp_path / "m.csv", split="train")) == 0


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("file,label\na.png,1\n", r"m.csv:1: missing column\(s\) \['path'\]"),
        ("path,label\na.png,1\nb.png,2\n", r"m.csv:3: .*label"),
        ("path,label\na.png,yes\n", r"m.csv:2: .*label"),
        ("path,label\n../secret.png,1\n", r"m.csv:2: .*escapes"),
        ("path,label\nx/../../secret.png,1\n", r"m.csv:2: .*escapes"),
        ("path,label\n/etc/passwd,1\n", r"m.csv:2: .*relative"),
        ("path,label,split\na.png,1,holdout\n", r"m.csv:2: split"),
        ("path,label\na.png,1\na.png,0\n", r"m.csv:3: .*already listed on line 2"),
        ("", r"m.csv:1: empty manifest"),
    ],
)
def test_bad_manifests_name_the_line(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(ManifestError, match=match):
        read_manifest(tmp_path / "m.csv")


def test_manifest_defaults_and_extra_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("path,label,split,patient\na.png,0,,p1\nb.png,1,VAL,p2\n\n")
    manifest = read_manifest(tmp_path / "m.csv")
    assert [(r.path, r.label, r.split, r.line) for r in manifest.rows] == [("a.png", 0, "train", 2), ("b.png", 1, "val", 3)]
    with pytest.raises(ManifestError, match="cannot open"):
        read_manifest(tmp_path / "absent.csv")
