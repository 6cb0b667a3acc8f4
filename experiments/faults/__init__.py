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

from experiments.faults.live import run_live, small_slice
from experiments.faults.plan import FaultCheckFailed, FaultPlan, LiveResult

__all__ = ["FaultCheckFailed", "FaultPlan", "LiveResult", "run_live", "small_slice"]
