"""Fault injection on a live federation and fuzzing of the aggregator's input (``fedmq faults
run``, ``make faults``), in one module per job:

- :mod:`~experiments.faults.plan`: what to do (``FaultPlan``) and what was seen (``LiveResult``);
- :mod:`~experiments.faults.federation`: the federation with the test launcher's hooks, and the
  administrator's queues (observer, dead letters);
- :mod:`~experiments.faults.live`: the live run (private broker, aggregator and DP sites as
  processes; SIGKILLs, a broker restart, closed connections, a site killed mid-publish);
- :mod:`~experiments.faults.fuzz`: the fuzzers (Hypothesis, a development dependency);
- :mod:`~experiments.faults.judge`: whether a run kept the guarantees (the rules, once);
- :mod:`~experiments.faults.report`: ``results.json`` and the printed lines;
- :mod:`~experiments.faults.run`: ``run_all``, the command's whole sequence;
- :mod:`~experiments.faults.cli`: the ``fedmq faults`` command.

The live run starts its site processes through ``tests/launcher.py`` (the one place test hooks
are injected), so it needs a fedmq checkout, not only an installed fedmq.
"""

from __future__ import annotations

import importlib
from typing import Any

# The names below load on first use, not with the package: `fedmq`'s command line imports
# experiments.faults.cli for every command (`fedmq aggregator run` included), and the live run
# pulls in torch, Opacus and MONAI, about 400 MB of resident memory in a process (the
# aggregator) that needs none of them.
_LAZY = {"run_live": "live", "small_slice": "live", "FaultCheckFailed": "plan", "FaultPlan": "plan",
         "LiveResult": "plan"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"fedmq.experiments.faults.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedmq.experiments.faults' has no attribute {name!r}")
