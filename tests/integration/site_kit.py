"""A tiny real hospital site on disk for tests: keys, a few PNG images, a manifest, settings.

Everything is real (CKKS context, hybrid signing keys, image files read by the site loader); it is only
small, so a SiteRuntime opens in a second or two.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.shared.ckks import init_keys
from fedmq.shared.signing import generate_aggregator_key, generate_site_key, private_key_path
from fedmq.site_agent.settings import SiteSettings


@dataclass
class SiteKit:
    root: Path
    secret_context: Path
    public_context: Path
    site_keys_dir: Path
    manifest: Path
    #: the aggregator's hybrid key pair (it signs versions; sites pin the public half)
    aggregator_key: Path
    aggregator_public_key: Path

    def settings(self, site_id: str = "alpha", **over: Any) -> SiteSettings:
        base: dict[str, Any] = dict(
            site_id=site_id, secret_context=self.secret_context,
            signing_key=private_key_path(self.site_keys_dir, site_id), manifest=self.manifest,
            aggregator_public_key=self.aggregator_public_key,
            state_dir=self.root / "state" / site_id, model_preset="small_cnn", image_size=28,
            batch_size=8, planned_rounds=3, target_epsilon=5.0, progress_bars=False, log_json=False,
        )
        base.update(over)
        return SiteSettings(**base)


def write_pngs(folder: Path, n_per_split: dict[str, int], size: int = 32, seed: int = 0) -> Path:
    """PNG images whose brightness follows the label (learnable), and their manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,split"]
    i = 0
    for split, n in n_per_split.items():
        for _ in range(n):
            label = i % 2
            img = rng.integers(0, 120, (size, size)) + 100 * label
            Image.fromarray(img.astype(np.uint8)).save(folder / f"img{i:03d}.png")
            lines.append(f"img{i:03d}.png,{label},{split}")
            i += 1
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def make_site_kit(root: Path, sites: tuple[str, ...] = ("alpha",), n_train: int = 24, n_val: int = 12) -> SiteKit:
    keys = init_keys(root / "keys")
    site_keys = root / "site-keys"
    for s in sites:
        generate_site_key(site_keys, s)
    manifest = write_pngs(root / "data", {"train": n_train, "val": n_val})
    agg_key, agg_pub = generate_aggregator_key(root / "aggregator-keys")
    return SiteKit(root, keys.secret_context, keys.public_context, site_keys, manifest, agg_key, agg_pub)
