"""What tracing shares with the flow, without importing OpenTelemetry.

With `tracing.enabled` false nothing here is ever set: the flow reads one context
variable where it sends a request upstream (Forwarder.send) and where it replays, finds
None, and goes on. With tracing on, proxy/tracing.py sets `CURRENT` for each request to
its `RequestTrace`, which adds our trace context to what the upstream receives and names
the original execution on a replay.

The first execution's trace and span ids are stored with the answer as one more
pseudo-header, `ORIGIN`, appended after the real ones (as responses.REASON is put before
them): the headers are sealed with the rest when encryption is on, and no migration is
needed. A replay removes it before anything reaches the client (`stored_origin`).
"""

from __future__ import annotations

import contextvars
from typing import Protocol

from multidict import CIMultiDict

ORIGIN = ":origin"  # the stored pseudo-header: "<trace id hex>-<span id hex>"


class RequestTrace(Protocol):
    """One proxied request's trace, as the flow sees it (proxy/tracing.py makes it)."""

    def outgoing(self, method: str, headers: CIMultiDict[str]) -> None:
        """The request is about to go upstream: a client span starts, and `headers`
        get its traceparent (and tracestate, baggage) and the request id."""

    def replayed(self, origin: str) -> tuple[str, str] | None:
        """This answer is a replay of the execution `origin` names: link to it; returns
        the header naming its trace for the client, or None."""

    def origin(self) -> str | None:
        """ORIGIN's value for this request's execution (its server span's ids)."""

    def log_fields(self, route: str) -> tuple[tuple[str, str], ...]:
        """What the request's log line adds: request id, trace and span ids, method,
        path template (never the path itself: it may hold the key)."""


CURRENT: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar(
    "idemproxy_request_trace", default=None)


def origin_value(trace_id: int, span_id: int) -> str:
    """What ORIGIN holds for the execution with these ids."""
    return f"{trace_id:032x}-{span_id:016x}"


def parse_origin(value: str) -> tuple[int, int] | None:
    """(trace id, span id) from ORIGIN's value; None when it is not one."""
    trace, _, span = value.partition("-")
    if len(trace) != 32 or len(span) != 16:
        return None
    try:
        ids = int(trace, 16), int(span, 16)
    except ValueError:
        return None
    return ids if ids[0] and ids[1] else None


def with_origin(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """`headers` to store, with this request's ORIGIN last when it is traced (the flow
    calls it where it also puts the record in the replay cache, the traced store for
    every completion)."""
    trace = CURRENT.get()
    if trace is None or (headers and headers[-1][0] == ORIGIN):
        return headers
    origin = trace.origin()
    return headers if origin is None else (*headers, (ORIGIN, origin))


def stored_origin(headers: tuple[tuple[str, str], ...]
                  ) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """(ORIGIN's value or None, the real headers). It is always the last one stored."""
    if headers and headers[-1][0] == ORIGIN:
        return headers[-1][1], headers[:-1]
    return None, headers
