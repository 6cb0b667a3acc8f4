"""No environment variable can switch on a test hook in an installed fedmq (issue 15).

Crash points and plaintext recording are hooks that tests inject (tests/launcher.py); the
product only has the seams. This test reads every product module and fails if one names a
``FEDMQ_*`` variable outside a short, reviewed list, or if a settings class (which pydantic
fills from ``FEDMQ_*`` variables) grows a field that sounds like a hook.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT_PACKAGES = ("aggregator", "broker", "shared", "site_agent", "experiments", "benchmarks")

#: every FEDMQ_* name product code may spell, and why it is not a test hook
ALLOWED_VARIABLES = {
    "FEDMQ_DATA_ROOT": "where the MedMNIST file lies (data location only)",
    "FEDMQ_AMQP_URL": "the demo's broker URL (same as the amqp_url setting)",
}
HOOK_WORDS = re.compile(r"crash|plaintext|record|hook|dump|kill", re.I)


def _product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT_PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _fedmq_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.update(re.findall(r"\bFEDMQ_[A-Z0-9_]+", node.value))
        elif isinstance(node, ast.keyword) and node.arg and node.arg.startswith("FEDMQ_"):
            names.add(node.arg)  # dict(FEDMQ_X=...) environments handed to subprocesses
    return names


def test_product_code_names_no_test_hook_variable() -> None:
    files = _product_files()
    assert len(files) > 50, "the product packages were not found"
    offenders = {}
    for path in files:
        for name in _fedmq_names(path):
            field = name.removeprefix("FEDMQ_").lower()
            if name in ALLOWED_VARIABLES or _is_setting(field):
                continue
            offenders.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert offenders == {}, f"product code names FEDMQ_* variables that are neither settings nor allowed: {offenders}"


def _settings_fields() -> set[str]:
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.shared.settings import FedmqSettings
    from fedmq.site_agent.settings import SiteSettings

    return {f for cls in (FedmqSettings, AggregatorSettings, SiteSettings) for f in cls.model_fields}


def _is_setting(field: str) -> bool:
    return field in _settings_fields()


def test_no_setting_is_a_test_hook() -> None:
    """Settings come from FEDMQ_* variables: none may crash a process or record plaintext."""
    fields = _settings_fields()
    assert "amqp_url" in fields and "site_id" in fields
    assert sorted(f for f in fields if HOOK_WORDS.search(f)) == []
