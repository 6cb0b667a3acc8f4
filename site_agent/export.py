"""Export the decrypted global model in a form clinical tooling loads without fedmq."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedmq.shared.atomic import atomic_write_json

if TYPE_CHECKING:
    from fedmq.site_agent.runtime import SiteRuntime


def export_model(rt: "SiteRuntime", out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    model = rt.current_model().eval()
    example = torch.zeros(1, 1, rt.settings.image_size, rt.settings.image_size)
    scripted = torch.jit.trace(model, example)
    version = rt.state.version
    model_path = out_dir / f"fedmq-{rt.settings.model_preset}-v{version}.pt"
    scripted.save(str(model_path))
    manifest_path = out_dir / f"fedmq-{rt.settings.model_preset}-v{version}.layout.json"
    atomic_write_json(
        manifest_path,
        {
            "version": version,
            "model_preset": rt.settings.model_preset,
            "input": {"shape": [1, 1, rt.settings.image_size, rt.settings.image_size], "range": [0.0, 1.0]},
            "output": "one logit; sigmoid gives P(positive class)",
            "layout_fingerprint": rt.layout.fingerprint,
            "layout": json.loads(rt.layout.model_dump_json()),
        },
    )
    return [model_path, manifest_path]
