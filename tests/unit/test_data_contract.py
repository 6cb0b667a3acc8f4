"""Issue 18: the data contract is checked before any budget is spent.

- a site refuses to train when too much of its manifest is unreadable (a wrong path prefix);
- CT/MR DICOMs in a chest X-ray folder are flagged, not silently trained on;
- ``fedmq site check-data`` reports counts, skipped files with reasons, modalities, sizes, and
  writes a contact sheet of what the model will see.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from integration.site_kit import make_site_kit, write_pngs
from fedmq.shared.cli import main
from fedmq.shared.errors import ConfigError
from fedmq.site_agent.data.check import check_data
from fedmq.site_agent.runtime import SiteRuntime
from unit.test_image_formats import write_dicom



def _mixed_folder(root: Path) -> Path:
    manifest = write_pngs(root, {"train": 10, "val": 4})
    write_dicom(root / "cxr.dcm", np.tile(np.arange(0, 400, 10, dtype=np.uint16), (30, 1)), modality="DX")
    write_dicom(root / "ct.dcm", np.tile(np.arange(0, 400, 10, dtype=np.uint16), (30, 1)), modality="CT")
    with manifest.open("a") as fh:
        fh.write("cxr.dcm,1,train\nct.dcm,0,train\nmissing.png,0,train\n")
    return manifest


def test_check_data_reports_and_flags_ct_in_a_chest_xray_folder(tmp_path):
    manifest = _mixed_folder(tmp_path / "data")
    rep = check_data(manifest, 28, expected_modalities=["CR", "DX"], max_unreadable_fraction=0.05,
                     out_dir=tmp_path / "out")
    reasons = {s["path"]: s["reason"] for s in rep.skipped}
    assert set(reasons) == {"ct.dcm", "missing.png"}
    assert "DICOM Modality CT" in reasons["ct.dcm"] and "not found" in reasons["missing.png"]
    assert rep.modalities == {"DX": 1, "CT": 1} and rep.body_parts == {"CHEST": 1}
    assert rep.formats == {"png": 14, "dicom": 1} and rep.intensity == {"min-max": 15}
    assert rep.per_split_class == {"train": {"0": 5, "1": 6}, "val": {"0": 2, "1": 2}}
    assert rep.sizes["rows_max"] == 32 and rep.sizes["cols_max"] == 40
    assert not rep.ok and "max_unreadable_fraction" in rep.problems[0]  # 2 of 17 > 5%
    sheet = Image.open(rep.contact_sheet)
    assert sheet.size[1] > 2 * 128  # one row per format: dicom and png
    assert json.loads((tmp_path / "out" / "data-report.json").read_text())["ok"] is False
    ok = check_data(manifest, 28, expected_modalities=["CR", "DX"], max_unreadable_fraction=0.2)
    assert ok.ok, ok.problems


def test_site_refuses_to_train_when_most_of_the_manifest_is_unreadable(tmp_path):
    kit = make_site_kit(tmp_path / "kit")
    bad = tmp_path / "elsewhere" / "manifest.csv"  # the manifest moved without its images: wrong prefix
    bad.parent.mkdir()
    lines = kit.manifest.read_text().splitlines()
    bad.write_text("\n".join(lines[:1] + lines[1:4] + [f"images/{ln}" for ln in lines[4:]]) + "\n")
    for ln in lines[1:4]:
        name = ln.split(",")[0]
        (bad.parent / name).write_bytes((kit.manifest.parent / name).read_bytes())
    with pytest.raises(ConfigError, match=r"were skipped \(\d+% > max_unreadable_fraction 5%\).*file not found"):
        SiteRuntime.open(kit.settings(manifest=bad, state_dir=tmp_path / "s"))
    assert not (tmp_path / "s" / "privacy-ledger.json").exists()


def test_check_data_command(tmp_path, capsys):
    """``fedmq site check-data`` through the CLI's own main (in this process: a subprocess only
    added a torch + MONAI import; test_cli.py runs the entry point itself as a process)."""
    kit = make_site_kit(tmp_path / "kit")
    cfg = tmp_path / "site.toml"
    s = kit.settings()
    cfg.write_text("\n".join(f'{k} = "{v}"' for k, v in (
        ("site_id", s.site_id), ("secret_context", s.secret_context), ("signing_key", s.signing_key), ("aggregator_public_key", s.aggregator_public_key),
        ("manifest", s.manifest), ("state_dir", tmp_path / "state"))) + "\n")
    code = main(["site", "check-data", "--config", str(cfg), "--out", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    assert "usable images: 36" in out.out and "OK: the site agent can train" in out.out
    assert (tmp_path / "out" / "contact-sheet.png").exists()
