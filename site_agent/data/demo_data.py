"""Turn the MedMNIST train split into N simulated hospitals with realistic heterogeneity.

Each hospital gets a label-skewed share (Dirichlet per class), its own file format and a
manifest with a local validation split, so the demo exercises the same loaders real sites
use. The official test split stays out of the hospitals: evaluation reads it directly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedmq.site_agent.data.errors import DataError
from fedmq.site_agent.data.readers import ImageFormat
from fedmq.site_agent.data.transforms import DEFAULT_IMAGE_SIZE

logger = logging.getLogger(__name__)

OfficialSplit = Literal["train", "val", "test"]
FORMAT_SUFFIX: dict[str, str] = {"dicom": ".dcm", "png": ".png", "nifti": ".nii.gz"}


def load_npz_split(npz_path: Path | str, split: OfficialSplit) -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N,H,W) and int64 labels (N,) of one official split."""
    with np.load(npz_path) as data:
        try:
            images = np.asarray(data[f"{split}_images"])
            labels = np.asarray(data[f"{split}_labels"]).reshape(-1).astype(np.int64)
        except KeyError as exc:
            raise DataError(f"{npz_path}: no {split!r} split ({exc})") from exc
    if images.ndim != 3:
        raise DataError(f"{npz_path}: expected grayscale 2D images (N,H,W), got {images.shape}")
    return images, labels


def load_official_split(
    npz_path: Path | str, split: OfficialSplit, image_size: int = DEFAULT_IMAGE_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """An official split as X (N,1,S,S) float32 in [0,1] and y (N,) float32.

    Same per-image min-max and area resize as the hospitals' transform chain (a test checks
    they agree bit for bit), so the evaluation set matches what models saw in training;
    done on the whole batch because the per-image MONAI chain is slow for thousands of images.
    """
    images, labels = load_npz_split(npz_path, split)
    X = torch.from_numpy(images.astype(np.float32))[:, None]
    if len(X):
        lo = X.amin(dim=(1, 2, 3), keepdim=True)
        hi = X.amax(dim=(1, 2, 3), keepdim=True)
        span = hi - lo
        flat = span == 0
        X = torch.where(flat, torch.zeros_like(X), (X - lo) / torch.where(flat, torch.ones_like(span), span))
        if tuple(X.shape[-2:]) != (image_size, image_size):
            X = torch.nn.functional.interpolate(X, size=(image_size, image_size), mode="area")
        X = X.clamp_(0.0, 1.0).contiguous()
    else:
        X = torch.empty((0, 1, image_size, image_size))
    return X, torch.from_numpy(labels.astype(np.float32))


def dirichlet_partition(
    labels: np.ndarray, n_sites: int, alpha: float, seed: int, min_per_class: int = 10
) -> list[np.ndarray]:
    """Indices per site: every site gets ``min_per_class`` of each class, the rest split by Dirichlet(alpha).

    Guaranteeing the minimum first (rather than resampling until lucky) keeps the result
    deterministic and always valid, while small alpha still yields strong label skew.
    """
    if n_sites < 1:
        raise ValueError("n_sites must be >= 1")
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    rng = np.random.default_rng(seed)
    per_site: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if len(idx) < n_sites * min_per_class:
            raise DataError(
                f"class {cls} has {len(idx)} images, fewer than {n_sites} sites x {min_per_class} minimum"
            )
        base, rest = idx[: n_sites * min_per_class], idx[n_sites * min_per_class :]
        for site in range(n_sites):
            per_site[site].append(base[site * min_per_class : (site + 1) * min_per_class])
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(rest)).round().astype(int)
        for site, part in enumerate(np.split(rest, cuts)):
            per_site[site].append(part)
    return [np.sort(np.concatenate(parts)) for parts in per_site]


def _local_split(indices: np.ndarray, labels: np.ndarray, val_fraction: float, rng: np.random.Generator) -> dict[int, str]:
    """Stratified train/val assignment so each site's validation set has both classes."""
    assignment: dict[int, str] = {}
    for cls in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == cls])
        n_val = int(round(len(members) * val_fraction))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        for i, idx in enumerate(members):
            assignment[int(idx)] = "val" if i < n_val else "train"
    return assignment


def _pseudonym(seed: int, site: str, index: int) -> str:
    return hashlib.sha256(f"fedmq-demo:{seed}:{site}:{index}".encode()).hexdigest()[:16].upper()


def write_dicom(path: Path, image: np.ndarray, *, site: str, index: int, seed: int) -> None:
    """A Secondary Capture DICOM with pseudonymous identifiers and deterministic UIDs."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def uid(kind: str) -> str:
        return generate_uid(prefix=None, entropy_srcs=["fedmq-demo", str(seed), site, str(index), kind])

    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    pseudonym = _pseudonym(seed, site, index)
    ds.PatientID = pseudonym
    ds.PatientName = f"ANON^{pseudonym}"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), mode="L").save(path)


def write_nifti(path: Path, image: np.ndarray) -> None:
    import nibabel as nib

    # NIfTI's first axis is x (the image's columns), its second y (rows): see readers.read_nifti
    nifti = nib.Nifti1Image(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).T), affine=np.eye(4))
    nifti.set_data_dtype(np.uint8)
    nib.save(nifti, str(path))


def _write(fmt: str, path: Path, image: np.ndarray, site: str, index: int, seed: int) -> None:
    if fmt == "dicom":
        write_dicom(path, image, site=site, index=index, seed=seed)
    elif fmt == "png":
        write_png(path, image)
    elif fmt == "nifti":
        write_nifti(path, image)
    else:
        raise ValueError(f"unknown format {fmt!r}")


def site_name(site_index: int) -> str:
    return f"hospital_{site_index + 1}"


def prepare_demo_data(
    npz_path: Path | str,
    out_dir: Path | str,
    n_sites: int = 3,
    alpha: float = 0.5,
    seed: int = 0,
    val_fraction: float = 0.15,
    formats: Sequence[ImageFormat] = ("dicom", "png", "nifti"),
    min_per_class: int = 10,
) -> dict:
    """Write ``out_dir/hospital_k/{images/, manifest.csv}`` plus ``summary.json``; returns the summary.

    The manifest's extra ``source_index`` column (index into the official train split) lets
    tests prove every image went to exactly one site; loaders ignore it.
    """
    if not formats:
        raise ValueError("formats must not be empty")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    out = Path(out_dir)
    images, labels = load_npz_split(npz_path, "train")
    parts = dirichlet_partition(labels, n_sites, alpha, seed, min_per_class=min_per_class)
    rng = np.random.default_rng(seed + 1)
    summary: dict = {
        "source": Path(npz_path).name,
        "split": "train",
        "n_sites": n_sites,
        "alpha": alpha,
        "seed": seed,
        "val_fraction": val_fraction,
        "total": int(len(labels)),
        "sites": {},
    }
    for site_index, indices in enumerate(parts):
        name = site_name(site_index)
        fmt = formats[site_index % len(formats)]
        site_dir = out / name
        (site_dir / "images").mkdir(parents=True, exist_ok=True)
        assignment = _local_split(indices, labels, val_fraction, rng)
        counts: dict[str, dict[str, int]] = {"train": {"0": 0, "1": 0}, "val": {"0": 0, "1": 0}}
        rows = []
        for idx in indices:
            idx = int(idx)
            relative = f"images/{idx:05d}{FORMAT_SUFFIX[fmt]}"
            _write(fmt, site_dir / relative, images[idx], name, idx, seed)
            split = assignment[idx]
            counts[split][str(int(labels[idx]))] += 1
            rows.append((relative, int(labels[idx]), split, idx))
        with (site_dir / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split", "source_index"])
            writer.writerows(rows)
        summary["sites"][name] = {
            "format": fmt,
            "dir": name,
            "n": int(len(indices)),
            "per_class": {c: counts["train"][c] + counts["val"][c] for c in ("0", "1")},
            "train": counts["train"],
            "val": counts["val"],
        }
        logger.info("%s: %d images as %s, classes %s", name, len(indices), fmt, summary["sites"][name]["per_class"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
