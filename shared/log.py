"""Structured (JSON lines) logging shared by every fedmq service.

Hospitals ship logs to a SIEM; one JSON object per line with stable keys is what those
pipelines parse without custom rules.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, separators=(",", ":"))


def configure_logging(level: str = "INFO", json_format: bool = True, component: str | None = None) -> None:
    """Install one handler on the root logger; called once by each CLI entry point."""
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        prefix = f"[{component}] " if component else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries(level)


#: third-party loggers and the level they run at. pika logs each reconnect as ~8 ERROR lines with
#: tracebacks, Opacus ~57 INFO lines per ResNet round: fedmq logs one line per event itself
#: (connection lost, retrying, giving up), so theirs only show with log_level DEBUG.
LIBRARY_LEVELS = {"pika": logging.CRITICAL, "opacus": logging.WARNING, "monai": logging.WARNING,
                  "PIL": logging.WARNING, "matplotlib": logging.WARNING}


def quiet_libraries(level: str = "INFO") -> None:
    debug = level.upper() == "DEBUG"
    for name, lib_level in LIBRARY_LEVELS.items():
        logging.getLogger(name).setLevel(logging.WARNING if debug else lib_level)
