"""One import package: every module says ``fedmq.<part>``, and the wheel installs only ``fedmq``.

Both spellings at once would load each module twice (two ``Intent`` enums that do not compare
equal), so the old top-level names must appear nowhere, not even in tests or benchmarks.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import fedmq

ROOT = Path(__file__).resolve().parents[2]


def _python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / f for f in out.split()]


def test_no_module_imports_an_old_top_level_name() -> None:
    offenders = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            if isinstance(node, ast.List):  # [sys.executable, "-m", "<module>", ...]
                items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                names = [m for flag, m in zip(items, items[1:]) if flag == "-m" and isinstance(m, str)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in fedmq.PARTS]
    assert offenders == [], f"import fedmq.<part>, not <part>: {offenders}"


def test_the_wheel_lists_every_package_folder_under_fedmq() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"fedmq"} | {
        "fedmq." + str(init.parent.relative_to(ROOT)).replace("/", ".")
        for part in fedmq.PARTS for init in (ROOT / part).rglob("__init__.py")
    }
    assert set(conf["packages"]) == folders
    assert {f"fedmq.{p}": p for p in fedmq.PARTS}.items() <= conf["package-dir"].items()


def test_the_cli_loads_no_module_twice() -> None:
    code = ("import sys, fedmq.shared.cli as c; c.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))" % (fedmq.PARTS,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
