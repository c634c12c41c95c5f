"""The proxied port's answers before and around the flow: one problem+json renderer for
every refusal (the flow's, the parser's, the admin's), framing refusals and
`100 Continue`. The connections themselves (parser errors as problem+json, the
`client:` limits) are proxy/http/connections.py's.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy import logs
from proxy.errors import (
    PROBLEM_JSON,
    BadRequest,
    InternalError,
    MethodNotSupported,
    ProblemError,
    retry_headers,
)

_handler_log = logging.getLogger("idemproxy.app")  # the handlers' refusals and 500s


def problem_response(exc: ProblemError, *, instance: str | None = None) -> web.Response:
    """The one place a problem becomes an HTTP answer (proxied port, admin, parser)."""
    resp = web.Response(status=exc.status, body=exc.body(instance=instance),
                        content_type=PROBLEM_JSON)
    resp.headers.update(retry_headers(exc.retry))
    resp.headers.update(exc.headers)
    if exc.close:
        resp.force_close()
    return resp


def refused(request: web.BaseRequest, exc: ProblemError) -> web.Response:
    """A refusal: its problem+json, and one log line unless the request has had its own."""
    if not logs.request_logged():  # one line per request: a guarded one has had it
        _handler_log.info("request refused", extra={"fields": {
            "method": request.method, "status": exc.status, "type": exc.slug}})
    return problem_response(exc)


def internal_error() -> web.Response:
    """Anything unexpected: logged with its traceback, answered as a generic 500."""
    _handler_log.exception("unhandled error in request handler")
    # Never "nothing was stored": the error may come after the upstream acted.
    return problem_response(InternalError("The proxy hit an internal error."))


def check_framing(request: web.BaseRequest) -> None:
    """Refuse what the parser lets through but a proxy must not forward ambiguously.

    Only HTTP/1.0 and 1.1 are proxied (a request line without a version parses as
    HTTP/0.9, which has no headers and so no framing to trust), and HTTP/1.0 has no
    chunked transfer coding (RFC 9112 §6.1): such a body is a smuggling shape.
    CONNECT asks for a tunnel to a host the client names: the proxy is a reverse proxy
    for its one upstream, never a forward one (and a tunnel is never guarded).
    """
    if request.method == "CONNECT":
        raise MethodNotSupported("CONNECT is not supported: this is a reverse proxy, not "
                                 "a forward proxy.", close=True)
    if request.version not in ((1, 0), (1, 1)):
        raise BadRequest(f"HTTP/{request.version.major}.{request.version.minor} is not "
                         "supported; send HTTP/1.1.", close=True)
    if request.version == (1, 0) and "Transfer-Encoding" in request.headers:
        raise BadRequest("HTTP/1.0 requests cannot use Transfer-Encoding.", close=True)


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def continue_if_expected(request: web.BaseRequest) -> None:
    """Answer `Expect: 100-continue` just before the body is first read (RFC 9110
    §10.1.1): every refusal that needs no body (413 by Content-Length, a missing key or
    credential) has been sent by then instead. The header itself never goes upstream."""
    if request.version != (1, 1) or not request.body_exists or request.content.is_eof():
        return
    if request.headers.get("Expect", "").lower() != "100-continue":
        return
    if request.transport is not None and not request.transport.is_closing():
        request.transport.write(CONTINUE)
