"""Logging, configured once per process: the coordinator (`rma admission serve`, whose stderr `rma up` keeps
in `coordinator.log`), `rma up` and the donor agent call `configure(component)` at start.

Every module logs to a named `rma.<part>` logger (`logging.getLogger("rma.reconciler")`); `configure` gives
the `rma` tree one stderr handler with UTC timestamps, or one JSON object a line when `RMA_LOG_JSON=1` (for a
log shipper). `RMA_LOG_LEVEL` (default INFO) sets the level. Nothing here logs secrets: callers log
credentials only by their `display()` form (prefix and id)."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import TextIO

ROOT = "rma"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(component)s] %(message)s"
_HANDLER_NAME = "rma.logs"


def _timestamp(record: logging.LogRecord) -> str:
    return (
        datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class _Component(logging.Filter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def filter(self, record: logging.LogRecord) -> bool:
        record.component = self.component
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, component, message (and exc when there is a traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "component": getattr(record, "component", ""),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(
    component: str, *, json_lines: bool | None = None, level: str | None = None, stream: TextIO | None = None
) -> logging.Logger:
    """Send the `rma.*` loggers' records to `stream` (stderr) with timestamps and `component`; JSON lines
    when `json_lines` (default: RMA_LOG_JSON=1). Calling it again replaces the handler, never adds one."""
    if json_lines is None:
        json_lines = os.environ.get("RMA_LOG_JSON", "").strip().lower() in ("1", "true", "yes")
    level = (level or os.environ.get("RMA_LOG_LEVEL") or "INFO").upper()
    if level not in logging.getLevelNamesMapping():  # a typo in RMA_LOG_LEVEL must not stop the program
        print(
            f"RMA_LOG_LEVEL={level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR): using INFO",
            file=sys.stderr,
        )
        level = "INFO"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    handler.addFilter(_Component(component))
    root = logging.getLogger(ROOT)
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # one line a record, whatever else configured the root logger
    return root
