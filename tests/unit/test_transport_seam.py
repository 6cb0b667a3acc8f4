"""pika lives behind the transport seam: no module outside broker/ imports it.

Every service, driver and benchmark reaches the broker through ``broker.transport`` (``Link``,
``connect_link``, ``run_reconnecting``), so swapping the client library or the transport
touches broker/ only. Tests may use pika directly (they check the broker itself)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("aggregator", "site_agent", "shared", "broker", "experiments", "benchmarks")


def _imports_pika(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import) and any(a.name == "pika" or a.name.startswith("pika.") for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == "pika" or node.module.startswith("pika.")):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)) and \
                getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__") and \
                node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] == "pika":
            lines.append(node.lineno)
    return lines


def test_pika_is_imported_under_broker_only() -> None:
    offenders = []
    seen_in_broker = False
    for pkg in PRODUCT:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            hits = _imports_pika(path)
            if pkg == "broker":
                seen_in_broker |= bool(hits)
            elif hits:
                offenders.append(f"{path.relative_to(ROOT)}:{hits}")
    assert offenders == [], f"pika imported outside broker/ (use fedmq.broker.transport): {offenders}"
    assert seen_in_broker, "the check found pika nowhere, not even in broker/: it would pass on anything"


def test_the_check_sees_each_way_of_importing(tmp_path: Path) -> None:
    for source in ("import pika\n", "import pika.exceptions as e\n", "from pika import BasicProperties\n",
                   "def f():\n    from pika.exceptions import AMQPError\n", "import importlib\nimportlib.import_module('pika')\n"):
        f = tmp_path / "m.py"
        f.write_text(source)
        assert _imports_pika(f), source
    f.write_text("from fedmq.broker.transport import Message  # pika in a comment\n")
    assert _imports_pika(f) == []
