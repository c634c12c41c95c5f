"""Moving bytes between the client and the upstream: request bodies in, responses out.

Used by both the unguarded pass-through and the guarded flow. Nothing here decides
anything about keys; it streams, and it notices when the client has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import BadRequest, BodyTooLarge, UpstreamError
from proxy.flow.decide import body_fits
from proxy.http import headers as hdrs
from proxy.http.framing import continue_if_expected
from proxy.http.limits import fits, reserve
from proxy.http.responses import Relayed, RelayedWhole, typed
from proxy.sizes import SMALL_BODY, SMALL_UPLOAD
from proxy.upstream.forward import Forwarder, UpstreamResponse

log = logging.getLogger("idemproxy.relay")


async def read_body(request: web.BaseRequest, *, limit: int) -> bytes:
    """The whole request body, refused with 413 as soon as it passes `limit` (chunked too)."""
    if request.content_length is not None and not body_fits(request.content_length,
                                                            limit=limit):
        raise BodyTooLarge(f"The request body is {request.content_length} bytes; this route "
                           f"accepts at most {limit}.")
    content = request.content
    if content.is_eof():  # all of it came with the headers (most small bodies): no await
        body = content.read_nowait()
        if not body_fits(len(body), limit=limit):
            raise _over(limit)
        return body
    declared = request.content_length or 0
    reserve(request, declared)  # client.max_body_memory, before a byte is buffered
    await continue_if_expected(request)
    buf = bytearray()
    try:
        async for chunk in content.iter_any():
            buf += chunk
            if not body_fits(len(buf), limit=limit):
                raise _over(limit)
            if len(buf) > declared:
                reserve(request, len(buf) - declared)
                declared = len(buf)
    except ConnectionError as exc:  # the client hung up mid-body: nobody left to answer
        raise BadRequest("The connection closed before the request body ended.",
                         close=True) from exc
    return bytes(buf)


def _over(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"The request body is over {limit} bytes, the most this route "
                        "accepts.")


async def _stream_body(request: web.BaseRequest) -> AsyncIterator[bytes]:
    await continue_if_expected(request)
    async for chunk in request.content.iter_any():
        yield chunk


def _small_upload(request: web.BaseRequest, forwarder: Forwarder) -> bool:
    """Read this unguarded body whole, for our own client? Only a declared length up to
    SMALL_UPLOAD, on a plain-HTTP upstream, and only if it has all arrived or
    client.max_body_memory has room for it (read_body reserves it): else it streams,
    which holds next to nothing."""
    length = request.content_length
    return length is not None and length <= SMALL_UPLOAD and \
        forwarder.sends_whole(request.method) and \
        (request.content.is_eof() or fits(request, length))


def upstream_request_headers(request: web.BaseRequest, forwarder: Forwarder) -> CIMultiDict[str]:
    return forwarder.forwarding.request_headers(request, upstream_host=forwarder.host)


async def open_upstream(request: web.BaseRequest, forwarder: Forwarder, *,
                        body: bytes | None,
                        set_headers: Mapping[str, str] | None = None) -> UpstreamResponse:
    """Send the request upstream once: `body` if the flow read it, a small one read whole
    (`_small_upload`), else streamed through. `set_headers` replace any the client sent
    under those names."""
    headers, data = _outgoing(request, forwarder, body, set_headers)
    if isinstance(data, _ReadWhole):
        data = await read_body(request, limit=SMALL_UPLOAD)
    url = request.rel_url
    up = await forwarder.send(method=request.method, raw_path=url.raw_path,
                              raw_query=url.raw_query_string, headers=headers, body=data)
    up.headers = forwarder.forwarding.response_headers(request, up.headers)
    return up


class _ReadWhole:
    """What _outgoing returns for a small upload still to be read whole (read_body)."""


_READ_WHOLE = _ReadWhole()


def _outgoing(request: web.BaseRequest, forwarder: Forwarder, body: bytes | None,
              set_headers: Mapping[str, str] | None = None
              ) -> tuple[CIMultiDict[str], bytes | AsyncIterator[bytes] | _ReadWhole | None]:
    """What open_upstream sends: the headers, and the body (or _READ_WHOLE)."""
    headers = upstream_request_headers(request, forwarder)
    if set_headers:
        for name, value in set_headers.items():
            headers[name] = value
    if body is not None or not request.body_exists:
        return headers, body
    if _small_upload(request, forwarder):
        return headers, _READ_WHOLE
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    return headers, _stream_body(request)


# How long a recording waits for a client that takes nothing before it records on
# without it (the client is then caught up from the store: execute._catch_up).
CLIENT_GRACE = 1.0


class ClientSink:
    """A streamed response to the client that keeps accepting writes after a hang-up.

    A client that disconnects must not stop the recording of the upstream's answer, so
    writes to a gone client are dropped and `gone` turns true. Nor may a client that
    stops reading (`write_lagging`): its write is left pending and the sink is `behind`.
    """

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        self.request = request
        self.response = response
        self.gone = False
        self.offered = 0  # bytes handed to write(), delivered or not
        self._pending: asyncio.Task[None] | None = None  # a write left behind
        self.behind = False

    async def start(self) -> None:
        try:
            await self.response.prepare(self.request)
        except (ConnectionError, RuntimeError):
            self.gone = True

    async def write(self, chunk: bytes) -> None:
        self.offered += len(chunk)
        if self.gone or not chunk:
            return
        await self._send(chunk)

    async def _send(self, chunk: bytes) -> None:
        try:
            await self.response.write(chunk)
        except (ConnectionError, RuntimeError):
            self.gone = True

    async def write_lagging(self, chunk: bytes, *, grace: float = CLIENT_GRACE) -> None:
        """write() for a recording, which must not wait on the client: if the write has
        not gone through within `grace` (the client takes nothing), it is left pending
        and the sink is `behind`; later writes are ignored until `settle()`.

        The write runs as a task of its own so it is never cancelled halfway (aiohttp
        leaves a cancelled drain waiter behind for the next write to trip on)."""
        if self.behind:
            return
        self.offered += len(chunk)
        if self.gone or not chunk:
            return
        task = asyncio.get_running_loop().create_task(self._send(chunk))
        done, _ = await asyncio.wait((task,), timeout=grace)
        if not done:
            self._pending, self.behind = task, True

    async def settle(self) -> None:
        """Wait for a write left pending: until the client takes it, or the connection
        ends (client.write_timeout aborts one that takes nothing)."""
        if self._pending is not None:
            await self._pending
            self._pending = None

    async def finish(self) -> None:
        if not self.gone:
            try:
                await self.response.write_eof()
            except (ConnectionError, RuntimeError):
                self.gone = True

    def abort(self) -> None:
        """Cut the connection so the client can tell the body is incomplete."""
        self.gone = True
        if self.request.transport is not None:
            self.request.transport.abort()


def response_for(up: UpstreamResponse, *, extra: dict[str, str] | None = None
                 ) -> web.StreamResponse:
    """A streamed response carrying the upstream's status and end-to-end headers."""
    resp = Relayed(status=up.status, reason=up.reason, typed=typed(up.headers))
    for k, v in hdrs.end_to_end(up.headers):
        resp.headers.add(k, v)
    for k, v in (extra or {}).items():
        resp.headers[k] = v
    return resp


def small_enough(request: web.BaseRequest, up: UpstreamResponse, *,
                 limit: int = SMALL_BODY) -> bool:
    """The one small-body test: a length known and at most `limit` (and SMALL_BODY), and
    a body to read (a HEAD answer's Content-Length describes a body that never comes).
    A 204 or 304 has none whatever its head says (RFC 9110 §15.3.5, §15.4.5): small, so
    the guarded flow stores it before the client has any of it, as every small answer."""
    length = 0 if up.status in (204, 304) else up.content_length
    return length is not None and length <= min(limit, SMALL_BODY) and \
        request.method != "HEAD"


async def pump(chunks: AsyncIterator[bytes], sink: ClientSink, *,
               record: Callable[[bytes], Awaitable[None]] | None = None) -> bytes:
    """The one streaming loop (pass-through, released answers, recording, replays).

    Without `record` it stops once the client has gone. With `record`, every chunk is
    recorded first and the copy goes on after a hang-up or without a client that stops
    reading (`write_lagging`: the answer is stored anyway, and the client caught up
    from the store); the last chunk is held back and returned: the caller writes it once
    the result is stored, since a client that has the whole answer must find the key
    completed when it retries at once. Failures of `chunks` propagate (the caller knows
    what they mean).
    """
    held = b""
    if record is None:
        async for chunk in chunks:
            await sink.write(chunk)
            if sink.gone:
                break
        return held
    async for chunk in chunks:
        await record(chunk)
        await sink.write_lagging(held)
        held = chunk
    return held


_LENGTH = frozenset({"content-length"})  # aiohttp sets it from the body


def whole_response(up: UpstreamResponse, body: bytes, extra: dict[str, str] | None, *,
                   headers: Iterable[tuple[str, str]] | None = None) -> web.Response:
    """A response with the upstream's status and end-to-end headers (or `headers`, when
    the caller has already sorted them), body in one piece."""
    resp = RelayedWhole(status=up.status, reason=up.reason, body=body,
                        typed=typed(up.headers))
    resp.headers.extend(hdrs.end_to_end(up.headers, without=_LENGTH) if headers is None
                        else headers)
    if extra:
        resp.headers.update(extra)
    return resp


async def pass_through(request: web.BaseRequest, forwarder: Forwarder, *,
                       body: bytes | None = None,
                       extra: dict[str, str] | None = None) -> web.StreamResponse:
    """Stream the request through untouched (hop-by-hop aside) and the response back.

    A small answer of known length goes back in one write; anything else streams. An
    upstream failure before the answer began raises its UpstreamError.
    """
    # open_upstream, inlined: one coroutine less on the path every unguarded request takes
    headers, data = _outgoing(request, forwarder, body)
    if isinstance(data, _ReadWhole):
        data = await read_body(request, limit=SMALL_UPLOAD)
    url = request.rel_url
    up = await forwarder.send(method=request.method, raw_path=url.raw_path,
                              raw_query=url.raw_query_string, headers=headers, body=data)
    up.headers = forwarder.forwarding.response_headers(request, up.headers)
    try:
        if small_enough(request, up):
            whole = up.arrived()
            return whole_response(up, await up.read() if whole is None else whole, extra)
        sink = ClientSink(request, response_for(up, extra=extra))
        await sink.start()
        try:
            await pump(up.chunks(), sink)
        except UpstreamError as exc:
            log.warning("upstream failed mid-body on an unguarded request: %s", exc)
            sink.abort()
            return sink.response
        await sink.finish()
        return sink.response
    finally:
        up.close()
