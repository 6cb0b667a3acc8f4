"""Find or fetch an official MedMNIST 2D ``.npz``, refusing any file whose MD5 is not the published one.

The caller passes the data root it read from settings (``FEDMQ_DATA_ROOT``); nothing here
reads the environment, so tests and tools can point it anywhere.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from pathlib import Path

from fedmq.site_agent.data.errors import ChecksumMismatch, DatasetDownloadError

logger = logging.getLogger(__name__)

MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}.npz"

# Official checksums from medmnist/info.py. Only entries verified against the published
# file are listed; for other datasets the caller must pass ``md5`` explicitly.
KNOWN_MD5: dict[str, str] = {
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
}

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_md5(name: str, md5: str | None = None) -> str:
    """The checksum to enforce; an unknown dataset without an explicit MD5 is refused rather than trusted."""
    if md5:
        value = md5.strip().lower()
        if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
            raise DatasetDownloadError(f"{md5!r} is not an MD5 hex digest")
        return value
    try:
        return KNOWN_MD5[name]
    except KeyError:
        raise DatasetDownloadError(
            f"no known MD5 for MedMNIST dataset {name!r}; pass --md5 with the value from medmnist/info.py"
        ) from None


def download_medmnist(
    name: str, dest_dir: Path, *, md5: str | None = None, url: str | None = None, timeout: float = 60.0
) -> Path:
    """Download to a temporary name and only rename once the MD5 matches, so no half file is ever used."""
    expected = expected_md5(name, md5)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / f"{name}.npz"
    partial = dest_dir / f".{name}.npz.part"
    source = url or MEDMNIST_URL.format(name=name)
    logger.info("downloading %s from %s", name, source)
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(source, timeout=timeout) as response, partial.open("wb") as out:  # noqa: S310
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DatasetDownloadError(f"download of {source} failed: {exc}") from exc
    actual = digest.hexdigest()
    if actual != expected:
        partial.unlink(missing_ok=True)
        raise ChecksumMismatch(source, expected, actual)
    os.replace(partial, target)
    logger.info("saved %s (MD5 %s verified)", target, actual)
    return target


def locate_medmnist(
    name: str = "pneumoniamnist",
    data_root: Path | str | None = None,
    *,
    download_dir: Path | str | None = None,
    md5: str | None = None,
    allow_download: bool = True,
    url: str | None = None,
) -> Path:
    """Return a verified path to ``{name}.npz``: the copy in ``data_root`` if present, else a download.

    A present-but-wrong file is refused, not replaced: it may be someone's deliberate copy,
    so a human should look at it.
    """
    expected = expected_md5(name, md5)
    if data_root is not None:
        candidate = Path(data_root) / f"{name}.npz"
        if candidate.is_file():
            actual = md5_of(candidate)
            if actual != expected:
                raise ChecksumMismatch(str(candidate), expected, actual)
            return candidate
    if not allow_download:
        raise DatasetDownloadError(f"{name}.npz not found in {data_root} and downloading is disabled")
    dest = Path(download_dir) if download_dir is not None else (Path(data_root) if data_root is not None else None)
    if dest is None:
        raise DatasetDownloadError("no data_root nor download_dir given to store the download")
    existing = dest / f"{name}.npz"
    if existing.is_file() and md5_of(existing) == expected:
        return existing
    return download_medmnist(name, dest, md5=expected, url=url)
