"""``python -m fedmq.aggregator [run options]``: same as ``fedmq aggregator run``."""

from __future__ import annotations

import sys

from fedmq.shared.cli import main

if __name__ == "__main__":
    sys.exit(main(["aggregator", "run", *sys.argv[1:]]))
