"""Generate docs/settings.md from the pydantic settings models: one source of truth.

Each field's description is the ``#:`` comment block right above it in the class body (the
comments the code already keeps); type, default and bounds come from the model itself. A test
(tests/unit/test_settings_doc.py) fails when docs/settings.md is not what this prints:

    python -m fedmq.shared.settings_doc > docs/settings.md
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

HEADER = """# Settings reference

Generated from the pydantic models by `python -m fedmq.shared.settings_doc > docs/settings.md`; a test
fails when this page and the code disagree. Every setting can be given (highest priority first)
as an argument on the command line where one exists, a `FEDMQ_<NAME>` environment variable, a
`.env` entry, or a key of the `--config` TOML file. Lists and dicts from the environment are
JSON (`FEDMQ_EXPECTED_MODALITIES='["CR","DX"]'`). Unknown keys are refused, with their name.
"""


def field_comments(cls: type) -> dict[str, str]:
    """``#:`` comment lines directly above each annotated field of ``cls``'s own body."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment: list[str] = []
            i = node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#:"):
                comment.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            out[node.target.id] = " ".join(comment)
    return out


def _type(info: FieldInfo) -> str:
    text = repr(info.annotation) if not isinstance(info.annotation, type) else info.annotation.__name__
    text = text.replace("typing.", "").replace("pathlib.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "**required**"
    value = info.default if info.default_factory is None else info.default_factory()  # type: ignore[call-arg]
    return f"`{value!s}`" if value is not None else "unset"


def _bounds(info: FieldInfo) -> str:
    parts = []
    for meta in info.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("pattern", "matches")):
            if getattr(meta, attr, None) is not None:
                parts.append(f"{sym} {getattr(meta, attr)}")
    return ", ".join(parts).replace("|", "\\|")


def section(title: str, cls: Any, own_only: bool) -> str:
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if hasattr(klass, "model_fields") and klass.__module__.startswith(("fedmq.shared", "fedmq.aggregator", "fedmq.site_agent")):
            try:
                comments.update(field_comments(klass))
            except (OSError, TypeError, IndexError):
                pass
    own = set(field_comments(cls)) if own_only else set(cls.model_fields)
    rows = ["| setting | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for name, info in cls.model_fields.items():
        if name not in own:
            continue
        rows.append(f"| `{name}` (`FEDMQ_{name.upper()}`) | {_type(info)} | {_default(info)} | {_bounds(info)} | "
                    f"{comments.get(name, '').replace('|', '/')} |")
    return f"## {title}\n\n" + "\n".join(rows) + "\n"


def render() -> str:
    from fedmq.aggregator.settings import AggregatorSettings
    from fedmq.shared.settings import FedmqSettings
    from fedmq.site_agent.settings import SiteSettings

    return "\n".join([
        HEADER,
        section("Every service (broker connection, logging, TLS)", FedmqSettings, own_only=False),
        section("Aggregator (`fedmq aggregator run`)", AggregatorSettings, own_only=True),
        section("Site agent (`fedmq site run`)", SiteSettings, own_only=True),
    ])


if __name__ == "__main__":
    sys.stdout.write(render())
