"""The one boundary where the upstream leg's failures become answers: whatever either
client raises (aiohttp's, or our own HTTP/1.1 client's) is translated here into an
`UpstreamError` carrying its problem (502, 504, the client's own 408) and whether the
request was sent, or answered (Caddy's reverse_proxy maps errors in one function too).
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.errors import (
    BodyTimeout,
    ProblemError,
    UpstreamError,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamTLSFailed,
    UpstreamUnreachable,
)
from proxy.upstream import client as lean
from proxy.upstream import tls as upstream_tls
from proxy.upstream import transfer

log = logging.getLogger("idemproxy.upstream")


# What either client raises for a failed exchange (anything else is a bug).
FAILURES = (aiohttp.ClientError, asyncio.TimeoutError, OSError, lean.NotSent,
             lean.SentFailure)


def translate(exc: BaseException, *, tls: bool = False) -> UpstreamError:
    if (stalled := _client_stalled(exc)) is not None:  # the client's fault: its 408
        return UpstreamError(stalled, sent=True)
    if isinstance(exc, (lean.BadAnswer, aiohttp.ClientResponseError)):
        return UpstreamError(UpstreamFailed(
            "The upstream answered with a response the proxy cannot relay (malformed or "
            "over the header limits); the request was executed."), sent=True, answered=True)
    if isinstance(exc, lean.NotSent):  # the cause names the upstream: not for clients
        return UpstreamError(UpstreamUnreachable(
            "Could not connect to the upstream; the request was not sent."), sent=False)
    if isinstance(exc, aiohttp.ClientSSLError) or (tls and _reset_in_handshake(exc)):
        log.error("TLS to the upstream failed; the request was not sent",
                  extra={"fields": {"reason": upstream_tls.failure_reason(exc)}})
        return UpstreamError(UpstreamTLSFailed(
            "The TLS handshake with the upstream failed (its certificate was not accepted, "
            "or it did not accept ours); the request was not sent."), sent=False)
    if isinstance(exc, lean.ReadTimeout):
        return UpstreamError(UpstreamTimeout(
            "The upstream did not answer in time; the outcome is unknown."), sent=True)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(UpstreamUnreachable(
            "The upstream refused the connection; the request was not sent."), sent=False)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamError(UpstreamUnreachable(
            "Connecting to the upstream timed out; the request was not sent."), sent=False)
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamError(UpstreamTimeout(
            "The upstream did not answer in time; the outcome is unknown."), sent=True)
    return UpstreamError(UpstreamFailed(
        f"The upstream connection failed after the request was sent "
        f"({type(exc).__name__}); the outcome is unknown."), sent=True)


def _reset_in_handshake(exc: BaseException) -> bool:
    """On an https upstream, a reset while connecting: the TCP connection was up, so the
    upstream broke off the TLS handshake (TLS 1.2 servers do so when they refuse our
    client certificate)."""
    return isinstance(exc, aiohttp.ClientConnectorError) and \
        isinstance(exc.os_error, ConnectionResetError)


def _client_stalled(exc: BaseException) -> BodyTimeout | None:
    """The client.body_timeout that broke a streamed upload, if that is what this was."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None or isinstance(seen, BodyTimeout):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def broken_off(exc: BaseException) -> UpstreamError:
    """A failure after the answer's head arrived: the upstream acted, so the outcome is
    known (executed) even though the answer cannot be relayed whole."""
    if isinstance(exc, (lean.BadAnswer, aiohttp.ClientResponseError, transfer.CodingError)):
        problem: ProblemError = UpstreamFailed(
            "The upstream answered with a response the proxy cannot relay (malformed "
            "framing or transfer coding); the request was executed.")
    elif isinstance(exc, (lean.ReadTimeout, asyncio.TimeoutError)):
        problem = UpstreamTimeout("The upstream stopped sending its answer before its end; "
                                  "the request was executed.")
    else:
        problem = UpstreamFailed("The upstream's answer broke off before its end; the "
                                 "request was executed.")
    return UpstreamError(problem, sent=True, answered=True)
