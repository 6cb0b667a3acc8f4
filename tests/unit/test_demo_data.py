"""Demo hospitals: non-IID split written as DICOM/PNG/NIfTI, read back through the real loaders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from fedmq.site_agent.data import (
    ChecksumMismatch,
    DatasetDownloadError,
    dirichlet_partition,
    load_dataset,
    load_official_split,
    locate_medmnist,
    md5_of,
    prepare_demo_data,
)
from fedmq.site_agent.data.medmnist_source import KNOWN_MD5, download_medmnist

SHARED_NPZ = Path(__file__).resolve().parents[3] / "shared" / "data" / "pneumoniamnist.npz"
PNEUMONIA_MD5 = "28209eda62fecd6e6a2d98b1501bb15f"


@pytest.fixture(scope="module")
def real_npz() -> Path:
    if not SHARED_NPZ.is_file():
        pytest.skip(f"{SHARED_NPZ} not present")
    return SHARED_NPZ


@pytest.fixture(scope="module")
def small_npz(real_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 400-image slice of the real train split keeps the test fast while staying real data."""
    with np.load(real_npz) as data:
        arrays = {k: data[k] for k in data.files}
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(arrays["train_labels"]), size=400, replace=False))
    arrays["train_images"], arrays["train_labels"] = arrays["train_images"][keep], arrays["train_labels"][keep]
    path = tmp_path_factory.mktemp("npz") / "small.npz"
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def demo(small_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, prepare_demo_data(small_npz, out, n_sites=3, alpha=0.5, seed=0, val_fraction=0.15)


def _manifest_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sites_formats_and_summary(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    assert json.loads((out / "summary.json").read_text()) == summary
    assert [s["format"] for s in summary["sites"].values()] == ["dicom", "png", "nifti"]
    suffixes = {"dicom": ".dcm", "png": ".png", "nifti": ".nii.gz"}
    for name, site in summary["sites"].items():
        rows = _manifest_rows(out / name / "manifest.csv")
        assert len(rows) == site["n"]
        assert all(r["path"].endswith(suffixes[site["format"]]) for r in rows)
        for split in ("train", "val"):
            assert site[split]["0"] >= 1 and site[split]["1"] >= 1, (name, split)
        assert min(site["per_class"].values()) >= 10


def test_every_image_read_back_exactly_once(demo: tuple[Path, dict], small_npz: Path) -> None:
    out, summary = demo
    X_all, y_all = load_official_split(small_npz, "train")
    seen: list[int] = []
    for name, site in summary["sites"].items():
        ds = load_dataset(out / name / "manifest.csv", split=None)
        assert ds.skipped == []
        assert len(ds) == site["n"]
        rows = {r["path"]: int(r["source_index"]) for r in _manifest_rows(out / name / "manifest.csv")}
        index = torch.tensor([rows[p] for p in ds.paths])
        seen.extend(index.tolist())
        # Lossless formats + same transform chain: bit-identical to the npz-based evaluation path.
        torch.testing.assert_close(ds.X, X_all[index], atol=1e-6, rtol=0)
        torch.testing.assert_close(ds.y, y_all[index])
        assert len(load_dataset(out / name / "manifest.csv", split="val")) == site["val"]["0"] + site["val"]["1"]
    assert sorted(seen) == list(range(len(y_all)))


def test_label_skew_and_unequal_sizes(demo: tuple[Path, dict]) -> None:
    _, summary = demo
    sites = summary["sites"].values()
    positive_share = [s["per_class"]["1"] / s["n"] for s in sites]
    sizes = [s["n"] for s in sites]
    assert max(positive_share) - min(positive_share) > 0.1
    assert len(set(sizes)) == 3


def test_partition_deterministic_and_minimum() -> None:
    labels = np.array([0] * 300 + [1] * 700)
    a = dirichlet_partition(labels, 4, alpha=0.3, seed=7, min_per_class=15)
    b = dirichlet_partition(labels, 4, alpha=0.3, seed=7, min_per_class=15)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))
    assert all(np.bincount(labels[p], minlength=2).min() >= 15 for p in a)
    c = dirichlet_partition(labels, 4, alpha=0.3, seed=8, min_per_class=15)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_dicom_files_are_valid_and_pseudonymous(demo: tuple[Path, dict]) -> None:
    out, _ = demo
    path = sorted((out / "hospital_1" / "images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)  # no force: real file meta and preamble
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8
    assert (ds.Rows, ds.Columns) == (28, 28) and ds.pixel_array.dtype == np.uint8
    assert ds.Modality == "CR" and len(ds.PatientID) == 16 and ds.PatientIdentityRemoved == "YES"


def test_more_sites_cycle_formats(small_npz: Path, tmp_path: Path) -> None:
    summary = prepare_demo_data(small_npz, tmp_path, n_sites=4, formats=("png", "nifti"), min_per_class=5)
    assert [s["format"] for s in summary["sites"].values()] == ["png", "nifti", "png", "nifti"]
    assert sum(s["n"] for s in summary["sites"].values()) == 400


def test_official_split_matches_transform_chain(small_npz: Path) -> None:
    from fedmq.site_agent.data.transforms import standard_postprocess

    with np.load(small_npz) as data:
        raw = data["val_images"][:20].astype(np.float32)
    raw[0] = 9.0  # a constant image must map to zeros in both paths
    np.savez(small_npz.with_name("v.npz"), val_images=raw.astype(np.uint8), val_labels=np.zeros((20, 1), np.uint8))
    for size in (28, 20, 40):
        X, _ = load_official_split(small_npz.with_name("v.npz"), "val", image_size=size)
        chain = standard_postprocess(("image",), size)
        expected = torch.stack([chain({"image": torch.from_numpy(r)[None]})["image"] for r in raw])
        torch.testing.assert_close(X, expected, atol=1e-6, rtol=0)
    assert torch.count_nonzero(X[0]) == 0


def test_official_test_split(real_npz: Path) -> None:
    X, y = load_official_split(real_npz, "test")
    assert X.shape == (624, 1, 28, 28) and X.dtype == torch.float32
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert y.tolist().count(1.0) == 390 and y.tolist().count(0.0) == 234


def test_locate_uses_data_root_after_md5_check(real_npz: Path, tmp_path: Path) -> None:
    assert KNOWN_MD5["pneumoniamnist"] == PNEUMONIA_MD5
    assert locate_medmnist("pneumoniamnist", real_npz.parent, allow_download=False) == real_npz
    bad = tmp_path / "pneumoniamnist.npz"
    bad.write_bytes(b"not the dataset")
    with pytest.raises(ChecksumMismatch, match=PNEUMONIA_MD5):
        locate_medmnist("pneumoniamnist", tmp_path, allow_download=False)
    assert bad.exists()  # a user's file is reported, not deleted
    with pytest.raises(DatasetDownloadError, match="no known MD5"):
        locate_medmnist("chestmnist", tmp_path)


def test_download_checks_md5_and_removes_partial(real_npz: Path, tmp_path: Path) -> None:
    url = real_npz.as_uri()  # urllib serves file:// like the zenodo URL
    with pytest.raises(ChecksumMismatch):
        download_medmnist("pneumoniamnist", tmp_path / "a", md5="0" * 32, url=url)
    assert list((tmp_path / "a").iterdir()) == []
    got = locate_medmnist("pneumoniamnist", None, download_dir=tmp_path / "b", url=url)
    assert got == tmp_path / "b" / "pneumoniamnist.npz" and md5_of(got) == PNEUMONIA_MD5
    with pytest.raises(DatasetDownloadError, match="failed"):
        download_medmnist("pneumoniamnist", tmp_path / "c", url=(tmp_path / "nope.npz").as_uri())
