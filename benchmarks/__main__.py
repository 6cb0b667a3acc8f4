"""``python -m benchmarks`` (``make bench``): run, judge and report every benchmark (``benchmarks.suite``)."""

from __future__ import annotations

import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
