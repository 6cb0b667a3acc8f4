"""A hospital's image list: a CSV next to the images, so sites can curate data without code.

Format: header ``path,label[,split]`` (extra columns are kept but ignored), ``path`` relative
to the manifest's folder, ``label`` 0 (normal) or 1 (finding), ``split`` one of
train/val/test (default train). Line numbers in errors count the header as line 1.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedmq.site_agent.data.errors import ManifestError

logger = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
REQUIRED_COLUMNS = ("path", "label")


class ManifestRow(BaseModel):
    """One image of the manifest, validated so that loaders never see a malformed entry."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    path: str = Field(min_length=1)
    label: Literal[0, 1]
    split: Split = "train"
    line: int = Field(ge=2, description="line in the CSV (header is line 1)")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("path is empty")
        if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute():
            raise ValueError(f"path {value!r} must be relative to the manifest's folder")
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text in {"0", "1"}:
                return int(text)
            raise ValueError(f"label {value!r} is not 0 or 1")
        return value

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if value is None or (isinstance(value, str) and not value.strip()):
            return "train"
        return value.strip().lower() if isinstance(value, str) else value


class Manifest(BaseModel):
    """A parsed manifest with the folder its paths are relative to."""

    model_config = ConfigDict(frozen=True)

    source: Path
    root: Path
    rows: tuple[ManifestRow, ...]

    def resolve(self, row: ManifestRow) -> Path:
        return self.root / row.path

    def select(self, split: Split | None) -> list[ManifestRow]:
        return [r for r in self.rows if split is None or r.split == split]


def _escapes(relative: str) -> bool:
    """Lexical check: '..' must not climb out. Symlinks placed by the site's admin are trusted."""
    normal = os.path.normpath(relative.replace("\\", "/"))
    return normal == ".." or normal.startswith("../") or os.path.isabs(normal)


def read_manifest(manifest_path: Path | str) -> Manifest:
    """Parse and validate the whole manifest up front so a typo fails loudly before any training."""
    source = Path(manifest_path)
    name = str(source)
    try:
        handle = source.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(name, None, f"cannot open manifest: {exc}") from exc
    root = source.parent.resolve()
    rows: list[ManifestRow] = []
    with handle:
        reader = csv.DictReader(handle)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if not header:
            raise ManifestError(name, 1, "empty manifest: expected a header 'path,label[,split]'")
        reader.fieldnames = header
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(name, 1, f"missing column(s) {missing}; header is {header}")
        seen: dict[str, int] = {}
        for record in reader:
            line = reader.line_num
            if None in record:
                raise ManifestError(name, line, "more fields than columns in the header")
            if all(v is None or not str(v).strip() for v in record.values()):
                continue  # blank line
            try:
                row = ManifestRow(
                    path=record.get("path") or "",
                    label=record.get("label"),
                    split=record.get("split"),
                    line=line,
                )
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors()
                )
                raise ManifestError(name, line, problems) from exc
            if _escapes(row.path):
                raise ManifestError(name, line, f"path {row.path!r} escapes the manifest's folder {root}")
            if row.path in seen:
                raise ManifestError(name, line, f"path {row.path!r} already listed on line {seen[row.path]}")
            seen[row.path] = line
            rows.append(row)
    logger.debug("manifest %s: %d rows", name, len(rows))
    return Manifest(source=source, root=root, rows=tuple(rows))
