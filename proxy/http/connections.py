"""The proxied port's connections: parser errors as problem+json, and the client limits.

Requests the HTTP parser itself refuses (bad framing, smuggling attempts, oversized
headers) are answered as problem+json too, with one log line and no traceback.
aiohttp answers parser errors from its protocol handler, before any application code or
middleware runs, with a text/plain body and a logged traceback. `ProxyRunner` swaps in a
protocol handler whose `handle_error` speaks RFC 9457 instead; the connection is closed
either way, since after a framing error the byte stream cannot be trusted.

The same handler bounds slow clients (`client:`): a request's head must arrive within
`header_timeout` of its first byte (or of the connection opening), a body may pause at
most `body_timeout` between bytes, an idle keep-alive connection lasts
`keepalive_timeout`, a write to the client may make no progress for at most
`write_timeout`, and at most `max_connections` are open per process. One timer per
connection checks the deadlines; nothing is re-armed per byte.

A client that stops reading its answer pauses the transport's writes (its buffer is
over the high-water mark) and every `await write` on it waits: without a bound, that
held the flow's database connection (a replay), its upstream connection (a
pass-through) or its key (a first request) for as long as the client liked (issue #25).
Past `write_timeout` with no byte taken, the connection is aborted: the waiting write
raises ConnectionError, which the flow treats as a client that hung up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_protocol, web_server

from proxy.config import Client
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    HeaderTimeout,
    InternalError,
    ProblemError,
)
from proxy.http.framing import problem_response

log = logging.getLogger("idemproxy.framing")


_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/problem+json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


def _problem_408(detail: str) -> bytes:
    """Written straight to the transport (no request object exists yet), so this is the
    one problem that does not go through problem_response; its body still does."""
    doc = HeaderTimeout(detail).body()
    return _TIMEOUT_408 % (len(doc), doc)


# aiohttp's private members the two classes below read, write or override. aiohttp does
# not promise them, so pyproject.toml pins aiohttp to the minor versions tested and
# tests/test_aiohttp_privates.py fails when one disappears (and when this list misses one).
AIOHTTP_PRIVATES = {
    "RequestHandler": frozenset({
        "_manager", "_messages", "_waiter", "_request_count", "_force_close",
        "_current_request", "_reading_paused", "_lingering_time", "_process_keepalive"}),
    "Server": frozenset({"_loop", "_kwargs"}),
}


class _ProblemRequestHandler(web_protocol.RequestHandler):
    """aiohttp's handler with problem+json parser errors and the `client:` limits."""

    def __init__(self, manager: Any, *, client: Client,
                 on_write_timeout: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(manager, keepalive_timeout=client.keepalive_timeout, **kwargs)
        self._limits = client
        self._on_write_timeout = on_write_timeout
        self._write_since: float | None = None  # writes paused, no progress since then
        self._write_left = 0  # bytes buffered for the client when last looked at
        self._head_since: float | None = None  # a request head is pending since then
        self._head_bytes = False  # ... and some of it has arrived
        self._last_byte = 0.0
        self._watch: asyncio.TimerHandle | None = None
        self._watch_at = 0.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._limits.max_connections:
            _log_sparsely("client connection refused: client.max_connections (%d) open",
                          self._limits.max_connections)
            self.force_close()
            return
        self._head_since = self._last_byte = time.monotonic()
        self._arm(self._head_since + self._limits.header_timeout)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_since = time.monotonic()
        self._write_left = self._buffered()
        self._arm(self._write_since + self._limits.write_timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_since = None

    def _buffered(self) -> int:
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            self._last_byte = now = time.monotonic()
            if self._waiting_for_head():
                self._head_bytes = True
                if self._head_since is None:
                    self._head_since = now  # the first byte of the next request
                    self._arm(now + self._limits.header_timeout)
        super().data_received(data)
        if self._head_since is not None and not self._waiting_for_head():
            self._head_since = None  # the head is complete: a request is queued or running
            self._head_bytes = False

    def _process_keepalive(self) -> None:
        if self._head_bytes:  # a request has begun: header_timeout decides, with its 408
            return
        super()._process_keepalive()

    def _waiting_for_head(self) -> bool:
        if self._messages:
            return False
        waiter = self._waiter
        if waiter is None:  # before the first message (start() may not run yet)
            return self._request_count == 0
        return not waiter.done()

    def _arm(self, at: float) -> None:
        if self._watch is not None:
            if self._watch_at <= at:
                return
            self._watch.cancel()
        self._watch_at = at
        self._watch = asyncio.get_running_loop().call_later(
            max(0.0, at - time.monotonic()), self._check)

    def _check(self) -> None:
        self._watch = None
        if self.transport is None:
            return
        now, lim = time.monotonic(), self._limits
        # Before the _force_close test: a closing transport still waits for its buffer
        # to drain, which a client that reads nothing never lets happen.
        if self._write_since is not None and self._write_timed_out(now):
            return
        if self._force_close:
            return
        if self._head_since is not None:
            if now - self._head_since >= lim.header_timeout:
                self._header_timed_out()
                return
            self._arm(self._head_since + lim.header_timeout)
            return
        request = self._current_request
        if request is not None and not request.content.is_eof() and \
                not self._reading_paused:
            if now - self._last_byte >= lim.body_timeout:
                log.info("client request body timed out", extra={"fields": {
                    "body_timeout_s": lim.body_timeout}})
                # The stream cannot be trusted any more and the answer closes it: aiohttp
                # must not linger reading the rest, which would raise this exception
                # again outside any handler (an "Unhandled exception" traceback).
                self._lingering_time = 0.0
                request.content.set_exception(BodyTimeout(
                    f"No request body bytes arrived for {lim.body_timeout:g}s "
                    "(client.body_timeout).", close=True))
                return
            self._arm(self._last_byte + lim.body_timeout)
            return
        self._arm(now + min(lim.header_timeout, lim.body_timeout))

    def _write_timed_out(self, now: float) -> bool:
        """Abort the connection if the client took no byte for write_timeout (True),
        else arm the check for when it would be due."""
        assert self._write_since is not None
        left, limit = self._buffered(), self._limits.write_timeout
        if left < self._write_left:  # the client took bytes since we last looked
            self._write_since = now
        self._write_left = left
        if now - self._write_since < limit:
            self._arm(self._write_since + limit)
            return False
        log.info("client write timed out", extra={"fields": {
            "write_timeout_s": limit, "buffered_bytes": left}})
        if self._on_write_timeout is not None:
            self._on_write_timeout()
        self._write_since = None
        if self.transport is not None:
            # Not force_close(): its close() would wait for the buffer to drain. Aborted,
            # connection_lost follows and fails the waiting write.
            self.transport.abort()
        return True

    def _header_timed_out(self) -> None:
        transport = self.transport
        log.info("client request header timed out", extra={"fields": {
            "header_timeout_s": self._limits.header_timeout, "partial": self._head_bytes}})
        if transport is not None and self._head_bytes:  # silence for one that sent nothing
            transport.write(_problem_408(
                f"The request head did not arrive within {self._limits.header_timeout:g}s "
                "(client.header_timeout)."))
        self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        reason = str(getattr(exc, "message", "") or message or exc or "").splitlines()
        detail = reason[0] if reason else "The request could not be parsed."
        problem: ProblemError
        if status >= 500:
            log.error("internal error while handling a request", exc_info=exc)
            problem = InternalError("The proxy hit an internal error.", close=True)
        else:
            log.warning("malformed request refused", extra={"fields": {
                "status": status, "error": type(exc).__name__ if exc else "", "detail": detail}})
            problem = BadRequest(detail[:300], close=True)
        problem.status = status  # the parser's own status (400, 413, 431, ...)
        return problem_response(problem)


_last_sparse_log = [0.0]


def _log_sparsely(msg: str, *args: Any) -> None:
    """At most one warning a second for events a flood repeats (refused connections)."""
    now = time.monotonic()
    if now - _last_sparse_log[0] >= 1.0:
        _last_sparse_log[0] = now
        log.warning(msg, *args)


class _ProblemServer(web_server.Server):
    def __init__(self, handler: Any, *, client: Client,
                 on_write_timeout: Callable[[], None] | None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._client = client
        self._on_write_timeout = on_write_timeout

    def __call__(self) -> web_protocol.RequestHandler:
        return _ProblemRequestHandler(self, client=self._client, loop=self._loop,
                                      on_write_timeout=self._on_write_timeout,
                                      **self._kwargs)


class ProxyRunner(web.ServerRunner):
    """Serves the proxy's one handler directly: no Application, router or middleware
    chain (the proxy routes by itself; about 5 µs a request), and parser errors are
    answered as problem+json."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 *, shutdown_timeout: float, client: Client | None = None,
                 on_write_timeout: Callable[[], None] | None = None) -> None:
        server = _ProblemServer(handler, client=client or Client(),
                                on_write_timeout=on_write_timeout,
                                handler_cancellation=False, access_log=None,
                                max_field_size=16384, max_line_size=16384)
        super().__init__(server, shutdown_timeout=shutdown_timeout)
