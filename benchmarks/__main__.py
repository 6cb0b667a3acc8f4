"""``python -m benchmarks``: run, judge and report every benchmark (``benchmarks.suite``) (``make bench``)."""

from __future__ import annotations

import sys

from benchmarks.suite import main

if __name__ == "__main__":
    sys.exit(main())
