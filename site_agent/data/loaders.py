"""Load a hospital's manifest into tensors, skipping (and reporting) files that cannot be used.

A single corrupt export must not stop a site from taking part, so unreadable images are
logged with their reason, counted, and left out; the caller decides if too many were lost.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedmq.site_agent.data.errors import ImageReadError
from fedmq.site_agent.data.manifest import Split, read_manifest
from fedmq.site_agent.data.readers import ImageInfo, MultiFrame
from fedmq.site_agent.data.transforms import DEFAULT_IMAGE_SIZE, INFO_SUFFIX, standard_transforms

logger = logging.getLogger(__name__)


@dataclass
class LoadedDataset:
    """Images ready for training: ``X`` (N,1,H,W) float32 in [0,1], ``y`` (N,) float32 0/1."""

    X: torch.Tensor
    y: torch.Tensor
    paths: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    load_seconds: float = 0.0
    #: per loaded image: format, original size, DICOM modality/body part, intensity rule
    infos: list[ImageInfo] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    def class_counts(self) -> dict[int, int]:
        return {c: int((self.y == c).sum()) for c in (0, 1)}

    @property
    def unreadable_fraction(self) -> float:
        total = len(self) + self.n_skipped
        return self.n_skipped / total if total else 0.0

    def skip_summary(self, limit: int = 3) -> str:
        """The commonest reasons, for one readable error line."""
        counts = Counter(_reason_kind(r) for _, r in self.skipped)
        return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common(limit))


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0][:120]


class ImageCache:
    """In-memory cache of standard tensors keyed by file identity, so repeated rounds skip decoding."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, int, int, int, str], torch.Tensor] = {}
        self._infos: dict[tuple[str, int, int, int, str], ImageInfo] = {}

    @staticmethod
    def _key(path: Path, image_size: int, multiframe: str) -> tuple[str, int, int, int, str] | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, image_size, multiframe)

    def get(self, path: Path, image_size: int, multiframe: str) -> torch.Tensor | None:
        key = self._key(path, image_size, multiframe)
        return None if key is None else self._items.get(key)

    def put(self, path: Path, image_size: int, multiframe: str, tensor: torch.Tensor, info: ImageInfo | None = None) -> None:
        key = self._key(path, image_size, multiframe)
        if key is not None:
            self._items[key] = tensor
            if info is not None:
                self._infos[key] = info

    def info(self, path: Path, image_size: int, multiframe: str) -> ImageInfo | None:
        key = self._key(path, image_size, multiframe)
        return None if key is None else self._infos.get(key)

    def __len__(self) -> int:
        return len(self._items)


def _root_cause(exc: BaseException) -> BaseException:
    """MONAI wraps transform errors in RuntimeError; dig out ours for a clean reason."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ImageReadError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return exc


def load_dataset(
    manifest_path: Path | str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    split: Split | None = "train",
    *,
    multiframe: MultiFrame = "refuse",
    cache: ImageCache | None = None,
    modalities: Collection[str] | None = None,
) -> LoadedDataset:
    """Read every image of ``split`` (all splits if None) listed in the manifest.

    ``image_size`` is the model preset's input size (the caller's: this module knows no model).
    ``modalities``: DICOM Modality values this site expects (e.g. CR, DX for chest radiographs);
    a DICOM of another modality (a CT or MR slice in an X-ray folder) is skipped with that reason.
    Raises ``ManifestError`` for a bad manifest (nothing sensible can be loaded then), but
    never for a bad image.
    """
    started = time.perf_counter()
    manifest = read_manifest(manifest_path)
    rows = manifest.select(split)
    chain = standard_transforms(image_size=image_size, multiframe=multiframe)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    infos: list[ImageInfo] = []
    wanted = {m.upper() for m in modalities} if modalities else None
    for row in rows:
        path = manifest.resolve(row)
        tensor = cache.get(path, image_size, multiframe) if cache is not None else None
        info = cache.info(path, image_size, multiframe) if cache is not None else None
        if tensor is None:
            try:
                out = chain({"image": str(path)})
                tensor, info = out["image"], out.get(f"image{INFO_SUFFIX}")
            except Exception as exc:  # one bad file must never stop the site
                cause = _root_cause(exc)
                reason = cause.reason if isinstance(cause, ImageReadError) else f"{type(cause).__name__}: {cause}"
                logger.warning("skipping %s (manifest line %d): %s", row.path, row.line, reason)
                skipped.append((row.path, reason))
                continue
            if cache is not None:
                cache.put(path, image_size, multiframe, tensor, info)
        if wanted is not None and info is not None and info.modality and info.modality.upper() not in wanted:
            reason = (f"unexpected modality: DICOM Modality {info.modality} (body part {info.body_part or '-'}) "
                      f"is not one of {sorted(wanted)} (expected_modalities)")
            logger.warning("skipping %s (manifest line %d): %s", row.path, row.line, reason)
            skipped.append((row.path, reason))
            continue
        if info is not None:
            infos.append(info)
        images.append(tensor)
        labels.append(row.label)
        paths.append(row.path)
    X = torch.stack(images) if images else torch.empty((0, 1, image_size, image_size), dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.float32)
    elapsed = time.perf_counter() - started
    if skipped:
        logger.warning(
            "%s: loaded %d image(s), skipped %d unreadable of %d", manifest.source, len(images), len(skipped), len(rows)
        )
    else:
        logger.info("%s: loaded %d image(s) in %.2fs", manifest.source, len(images), elapsed)
    return LoadedDataset(X=X, y=y, paths=paths, skipped=skipped, load_seconds=elapsed, infos=infos)
