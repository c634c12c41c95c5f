"""Requests the HTTP parser itself refuses (bad framing, smuggling attempts, oversized
headers) are answered as problem+json too, with one log line and no traceback.

aiohttp answers parser errors from its protocol handler, before any application code or
middleware runs, with a text/plain body and a logged traceback. `ProxyRunner` swaps in a
protocol handler whose `handle_error` speaks RFC 9457 instead; the connection is closed
either way, since after a framing error the byte stream cannot be trusted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_protocol, web_server

from proxy.errors import PROBLEM_JSON, BadRequest, InternalError, ProblemError

log = logging.getLogger("idemproxy.framing")


def problem_response(exc: ProblemError, *, instance: str | None = None) -> web.Response:
    """The one place a problem becomes an HTTP answer (proxied port, admin, parser)."""
    resp = web.Response(status=exc.status, body=exc.body(instance=instance),
                        content_type=PROBLEM_JSON)
    resp.headers.update(exc.headers)
    if exc.close:
        resp.force_close()
    return resp


def check_framing(request: web.BaseRequest) -> None:
    """Refuse what the parser lets through but a proxy must not forward ambiguously.

    Only HTTP/1.0 and 1.1 are proxied (a request line without a version parses as
    HTTP/0.9, which has no headers and so no framing to trust), and HTTP/1.0 has no
    chunked transfer coding (RFC 9112 §6.1): such a body is a smuggling shape.
    """
    if request.version not in ((1, 0), (1, 1)):
        raise BadRequest(f"HTTP/{request.version.major}.{request.version.minor} is not "
                         "supported; send HTTP/1.1.", close=True)
    if request.version == (1, 0) and "Transfer-Encoding" in request.headers:
        raise BadRequest("HTTP/1.0 requests cannot use Transfer-Encoding.", close=True)


class _ProblemRequestHandler(web_protocol.RequestHandler):
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


class _ProblemServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.ServerRunner):
    """Serves the proxy's one handler directly: no Application, router or middleware
    chain (the proxy routes by itself; about 5 µs a request), and parser errors are
    answered as problem+json."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 *, shutdown_timeout: float) -> None:
        server = _ProblemServer(handler, handler_cancellation=False, access_log=None,
                                max_field_size=16384, max_line_size=16384)
        super().__init__(server, shutdown_timeout=shutdown_timeout)
