"""The one registry of datasets the reproduction accepts: MedMNIST 2D binary tasks, official npz files.

A name resolves to ``<data root>/<file>``; the file must exist and match the MD5 that MedMNIST
publishes for it (``medmnist.info.INFO``, records 10519652 on Zenodo). The reproduction's
model has one logit, so only binary-class 2D tasks are listed: a multi-class or multi-label
MedMNIST set would need a different head and is refused by name. There is no download: the
machines this runs on are often offline, and a hospital fetches data through its own channel;
the error says where the file comes from.

A file outside the registry (a subset for a test, a private re-export in the same format) is
run only when named explicitly by path (``--npz``), and its MD5 is recorded, not checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """An unknown dataset name, a missing file, or a file whose MD5 is not the published one."""


@dataclass(frozen=True)
class MedmnistTask:
    name: str
    file: str
    md5: str
    url: str
    labels: tuple[str, str]
    n_train: int
    n_val: int
    n_test: int


_ZENODO = "https://zenodo.org/records/10519652/files/"

#: MedMNIST v2/v3 2D binary-class tasks at 28 x 28 (the size small_cnn takes)
REGISTRY: dict[str, MedmnistTask] = {
    t.name: t
    for t in (
        MedmnistTask("pneumoniamnist", "pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f",
                     _ZENODO + "pneumoniamnist.npz", ("normal", "pneumonia"), 4708, 524, 624),
        MedmnistTask("breastmnist", "breastmnist.npz", "750601b1f35ba3300ea97c75c52ff8f6",
                     _ZENODO + "breastmnist.npz", ("malignant", "normal, benign"), 546, 78, 156),
    )
}


def md5_of(path: Path) -> str:
    h = hashlib.md5()  # noqa: S324 - MedMNIST publishes MD5s; this checks integrity, not authenticity
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def task(name: str) -> MedmnistTask:
    try:
        return REGISTRY[name]
    except KeyError:
        raise DatasetError(
            f"unknown dataset {name!r}: the reproduction takes MedMNIST 2D binary tasks ({', '.join(sorted(REGISTRY))}); "
            "multi-class sets are refused because the model has one logit; a file of your own in the same npz "
            "format can be given with --npz PATH"
        ) from None


def resolve(name: str, root: Path) -> Path:
    """The verified path of a registered dataset under ``root``; a clear error otherwise."""
    t = task(name)
    path = Path(root) / t.file
    if not path.is_file():
        raise DatasetError(f"{path} not found: download {t.url} (MD5 {t.md5}) into {Path(root)}")
    got = md5_of(path)
    if got != t.md5:
        raise DatasetError(
            f"{path} has MD5 {got}, not the published {t.md5} for {t.name}: a truncated or altered file; "
            f"download it again from {t.url}"
        )
    return path


def table() -> str:
    """The registry as a markdown table (docs/reproduction.md carries it)."""
    rows = ["| name | file | MD5 | labels (0 / 1) | train / val / test |", "|---|---|---|---|---|"]
    for t in REGISTRY.values():
        rows.append(f"| {t.name} | {t.file} | `{t.md5}` | {t.labels[0]} / {t.labels[1]} | "
                    f"{t.n_train} / {t.n_val} / {t.n_test} |")
    return "\n".join(rows)
