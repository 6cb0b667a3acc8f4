"""``python -m benchmarks`` (``make bench``): run every section, judge it against the goals,
write the report.

- ``benchmarks.run``: the measurements (one function per section, sized by ``Sizes``);
- ``benchmarks.goals``: the goals, one table;
- ``benchmarks.judge``: each goal against this run's figure;
- ``benchmarks.report``: ``benchmarks/results/latest.json`` and ``latest.md``, and the lines printed.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

from benchmarks import judge, report
from benchmarks.run import SECTIONS, Sizes, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for checking the harness)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    ap.add_argument("--out", type=Path, default=report.RESULTS_DIR)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sz = Sizes.tiny() if args.quick else Sizes.full()
    if args.skip:
        sz = replace(sz, skip=tuple(s.strip() for s in args.skip.split(",") if s.strip()))
    result = run(sz)
    result["verdicts"] = judge.verdicts(result)
    j, m = report.write(result, args.out)
    for line in report.summary_lines(result):
        print(line)
    print(f"wrote {j} and {m} in {result['total_seconds']:.0f}s")
    return 0
