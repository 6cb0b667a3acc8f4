"""fedmq: one import package over the folders the design fixes.

Installed (a wheel, the Docker image), ``fedmq.broker``, ``fedmq.aggregator``,
``fedmq.site_agent``, ``fedmq.shared`` and ``fedmq.experiments`` are ordinary subpackages
(pyproject.toml maps each onto its folder), so fedmq claims one name in site-packages and
cannot collide with another distribution's ``shared`` or ``broker``.

In a source checkout the folders stay at the top level, where the design puts them; this
package's path then also reaches the checkout's root, so ``fedmq.shared`` is ``shared/``
whether the checkout is on ``PYTHONPATH``, installed editable, or a git worktree. Every import
says ``fedmq.<part>`` (tests/unit/test_import_names.py holds that): with both spellings in use
Python would load each module twice.
"""
from __future__ import annotations

from pathlib import Path

#: the folders this package maps, in the order docs/architecture.md describes them
PARTS: tuple[str, ...] = ("shared", "broker", "aggregator", "site_agent", "experiments")

_here = Path(__file__).resolve().parent
_root = _here.parent
if not (_here / "shared").is_dir() and (_root / "shared" / "__init__.py").is_file():
    __path__.append(str(_root))  # type: ignore[name-defined]  # source checkout: parts live beside us
