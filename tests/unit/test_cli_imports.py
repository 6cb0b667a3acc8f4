"""The command line stays light for the services: `fedmq aggregator run` builds the whole
parser (every group's module is imported), so a group module that imports the site's training
stack at import time puts torch, Opacus and MONAI into the aggregator's process. That happened
once through ``experiments.faults``' package ``__init__`` and cost the aggregator ~400 MB of
resident memory (peak RSS 4.1x the encrypted ResNet-50 model instead of 2.7x)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "opacus", "monai")


def test_building_the_cli_imports_no_training_stack() -> None:
    code = ("import json, sys, fedmq.shared.cli; fedmq.shared.cli.build_parser(); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_faults_package_still_exports_its_names_lazily() -> None:
    import fedmq.experiments.faults as faults

    assert faults.FaultPlan().aggregator_kills >= 1 and callable(faults.run_live)
