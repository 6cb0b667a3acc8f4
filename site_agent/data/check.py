"""``fedmq site check-data``: look at a hospital's data the way the site agent will, before training.

Nothing here trains or sends anything. The report counts images per split and class, lists every
skipped file with its reason (unreadable, missing, unexpected DICOM modality), counts formats,
DICOM modalities and body parts, the intensity rule applied (window, VOI LUT, min-max) and the
original image sizes, and writes a contact sheet: a PNG with a few images of each format exactly
as the model will see them (orientation, windowing, padding, input size), so a person can look.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmq.site_agent.data.loaders import load_dataset
from fedmq.site_agent.data.manifest import read_manifest

CONTACT_SHEET = "contact-sheet.png"
REPORT_FILE = "data-report.json"


@dataclass
class DataReport:
    manifest: str
    root: str
    image_size: int
    rows: int
    usable: int
    per_split_class: dict[str, dict[str, int]]
    skipped: list[dict[str, str]]
    formats: dict[str, int]
    modalities: dict[str, int]
    body_parts: dict[str, int]
    intensity: dict[str, int]
    sizes: dict[str, Any]
    unreadable_fraction: float
    max_unreadable_fraction: float
    problems: list[str] = field(default_factory=list)
    contact_sheet: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "ok": self.ok}, indent=2, sort_keys=True)

    def render(self) -> str:
        lines = [f"manifest {self.manifest} ({self.rows} rows; paths relative to {self.root})",
                 f"usable images: {self.usable}; skipped: {len(self.skipped)} "
                 f"({self.unreadable_fraction:.1%}, limit {self.max_unreadable_fraction:.0%})"]
        for split, counts in sorted(self.per_split_class.items()):
            lines.append(f"  {split:<5} " + "  ".join(f"label {k}: {v}" for k, v in sorted(counts.items())))
        for title, counts in (("formats", self.formats), ("DICOM modalities", self.modalities),
                              ("DICOM body parts", self.body_parts), ("intensity rule", self.intensity)):
            if counts:
                lines.append(f"{title}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        if self.sizes:
            lines.append(f"original sizes (rows x columns): {self.sizes['rows_min']}..{self.sizes['rows_max']} x "
                         f"{self.sizes['cols_min']}..{self.sizes['cols_max']}; commonest "
                         + ", ".join(f"{s} ({n})" for s, n in self.sizes["commonest"])
                         + f"; model input {self.image_size} x {self.image_size} (aspect kept, padded)")
        for item in self.skipped[:20]:
            lines.append(f"  skipped {item['path']}: {item['reason']}")
        if len(self.skipped) > 20:
            lines.append(f"  ... and {len(self.skipped) - 20} more (see {REPORT_FILE})")
        if self.contact_sheet:
            lines.append(f"contact sheet: {self.contact_sheet}")
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["OK: the site agent can train on this data"]
        return "\n".join(lines)


def check_data(
    manifest: Path, image_size: int, *, expected_modalities: list[str] | None, max_unreadable_fraction: float,
    out_dir: Path | None = None, per_format: int = 6,
) -> DataReport:
    parsed = read_manifest(manifest)
    ds = load_dataset(manifest, image_size, split=None, modalities=expected_modalities or None)
    split_of = {r.path: r.split for r in parsed.rows}
    per_split: dict[str, Counter[str]] = {}
    for path, label in zip(ds.paths, ds.y.tolist()):
        per_split.setdefault(split_of[path], Counter())[str(int(label))] += 1
    skipped_modalities = Counter(r.split("Modality ")[1].split(" ")[0] for _, r in ds.skipped if "DICOM Modality" in r)
    modalities = Counter(i.modality for i in ds.infos if i.modality) + skipped_modalities
    sizes: dict[str, Any] = {}
    if ds.infos:
        rows = [i.rows for i in ds.infos]
        cols = [i.columns for i in ds.infos]
        sizes = {"rows_min": min(rows), "rows_max": max(rows), "cols_min": min(cols), "cols_max": max(cols),
                 "commonest": Counter(f"{i.rows}x{i.columns}" for i in ds.infos).most_common(3)}
    problems = []
    if ds.unreadable_fraction > max_unreadable_fraction:
        problems.append(f"{ds.n_skipped} of {len(ds) + ds.n_skipped} images skipped ({ds.unreadable_fraction:.0%}) "
                        f"> max_unreadable_fraction {max_unreadable_fraction:.0%}: {ds.skip_summary()}")
    for split in ("train", "val"):
        counts = per_split.get(split, Counter())
        if not counts:
            problems.append(f"no usable {split} images")
        elif len(counts) < 2:
            problems.append(f"the {split} split has only label {next(iter(counts))}: both classes are needed")
    report = DataReport(
        manifest=str(manifest), root=str(parsed.root), image_size=image_size, rows=len(parsed.rows), usable=len(ds),
        per_split_class={k: dict(v) for k, v in per_split.items()},
        skipped=[{"path": p, "reason": r} for p, r in ds.skipped],
        formats=dict(Counter(i.format for i in ds.infos)), modalities=dict(modalities),
        body_parts=dict(Counter(i.body_part for i in ds.infos if i.body_part)),
        intensity=dict(Counter(i.intensity for i in ds.infos)), sizes=sizes,
        unreadable_fraction=round(ds.unreadable_fraction, 4), max_unreadable_fraction=max_unreadable_fraction,
        problems=problems,
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if len(ds):
            report.contact_sheet = str(write_contact_sheet(ds.X, [i.format for i in ds.infos], ds.paths,
                                                           out_dir / CONTACT_SHEET, per_format))
        (out_dir / REPORT_FILE).write_text(report.to_json())
    return report


def write_contact_sheet(X: torch.Tensor, formats: list[str], paths: list[str], out: Path, per_format: int,
                        tile: int = 128) -> Path:
    """One row per format, up to ``per_format`` images each, as the model sees them (grey, 0..1)."""
    from PIL import Image, ImageDraw

    by_format: dict[str, list[int]] = {}
    for i, fmt in enumerate(formats):
        if len(by_format.setdefault(fmt, [])) < per_format:
            by_format[fmt].append(i)
    label_w = 70
    sheet = Image.new("L", (label_w + per_format * (tile + 4), len(by_format) * (tile + 18) + 4), color=40)
    draw = ImageDraw.Draw(sheet)
    for r, (fmt, idx) in enumerate(sorted(by_format.items())):
        y = 4 + r * (tile + 18)
        draw.text((4, y + tile // 2), fmt, fill=255)
        for c, i in enumerate(idx):
            arr = (X[i, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
            thumb = Image.fromarray(arr).resize((tile, tile), Image.NEAREST)
            x = label_w + c * (tile + 4)
            sheet.paste(thumb, (x, y))
            draw.text((x, y + tile + 2), Path(paths[i]).name[:20], fill=200)
    sheet.save(out)
    return out
