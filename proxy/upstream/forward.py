"""The upstream leg: sends each request exactly once.

Two clients: for a plain-HTTP upstream, requests with a whole body (or none) go through
our own HTTP/1.1 client (proxy/upstream/client.py: ~17 µs of CPU per small request, ~53 µs
through aiohttp's); HTTPS upstreams, streamed request bodies and HEAD go through aiohttp's
ClientSession.

Errors map to problems in exactly one function, `upstream_errors.translate` (into `UpstreamError`):
a failure before the request was written (connection refused, connect timeout) means no
effect happened (`sent=False`); any failure after that means the upstream may have acted
(`sent=True`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import tracectx
from proxy.config import Upstream
from proxy.http.forwarded import Forwarding
from proxy.http.responses import relayable_reason
from proxy.sizes import CHUNK
from proxy.upstream import aiohttp_pool as upstream_conns
from proxy.upstream import client as lean
from proxy.upstream import tls as upstream_tls
from proxy.upstream import transfer
from proxy.upstream.failures import FAILURES, broken_off, translate

log = logging.getLogger("idemproxy.upstream")

# One verdict per upstream answer, whichever client carries it (RFC 9112 §5: servers
# choose their limits; ours are the same for both): a header line of at most 64 KiB,
# at most 128 header fields.
MAX_FIELD = lean.MAX_FIELD
MAX_HEADERS = lean.MAX_HEADERS


class _Body(Protocol):
    """A response body from either client."""

    def chunks(self, size: int) -> AsyncIterator[bytes]: ...
    def arrived(self) -> bytes | None: ...
    async def read(self) -> bytes: ...
    def close(self) -> None: ...


class _AiohttpBody:
    def __init__(self, raw: aiohttp.ClientResponse) -> None:
        self._raw = raw

    def chunks(self, size: int) -> AsyncIterator[bytes]:
        return self._raw.content.iter_chunked(size)

    def arrived(self) -> bytes | None:
        return None

    async def read(self) -> bytes:
        return await self._raw.read()

    def close(self) -> None:
        self._raw.release()


@dataclass(slots=True)
class UpstreamResponse:
    """A final answer's head has arrived: the upstream acted, whatever happens to its body,
    so every failure from here on is `answered` (design §9: one verdict per answer)."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    content_length: int | None
    body: _Body
    decoder: transfer.Decoder | None = None  # transfer codings to undo (gzip, deflate)

    @classmethod
    def of(cls, status: int, reason: str | None, headers: CIMultiDictProxy[str],
           content_length: int | None, body: _Body) -> UpstreamResponse:
        """The answer as relayed: a reason phrase that can be written, transfer codings
        understood (or refused: UpstreamError, answered)."""
        try:
            applied = transfer.codings(headers)
        except transfer.CodingError as exc:
            body.close()
            raise broken_off(lean.BadAnswer(str(exc))) from exc
        decoder = transfer.Decoder(applied) if applied else None
        return cls(status, relayable_reason(reason), headers,
                   None if decoder else content_length, body, decoder)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; failures mid-body raise UpstreamError(answered)."""
        try:
            async for chunk in self.body.chunks(CHUNK):
                if self.decoder is None:
                    yield chunk
                    continue
                for piece in self.decoder.feed(chunk):
                    yield piece
            if self.decoder is not None:
                self.decoder.finish()
        except (*FAILURES, transfer.CodingError) as exc:
            raise broken_off(exc) from exc

    def arrived(self) -> bytes | None:
        """The whole body if it has all arrived already (then as `read` would give it,
        without an await), else None."""
        return self.body.arrived() if self.decoder is None else None

    async def read(self) -> bytes:
        """The whole body (for small ones of known length); failures as in `chunks`."""
        if self.decoder is not None:
            return b"".join([chunk async for chunk in self.chunks()])
        try:
            return await self.body.read()
        except FAILURES as exc:
            raise broken_off(exc) from exc

    def close(self) -> None:
        self.body.close()


class Forwarder:
    """Sends requests to the one configured upstream; a client can never pick another."""

    def __init__(self, session: aiohttp.ClientSession, base: URL,
                 lean_pool: lean.UpstreamPool | None = None, *,
                 tls: ssl.SSLContext | None = None, server_name: str | None = None,
                 connect_timeout: float = 5.0) -> None:
        self._session = session
        self.tls, self.server_name = tls, server_name  # for https (and upgrade tunnels)
        self.connect_timeout = connect_timeout
        self.base = base
        self._base = base
        self._path = base.raw_path.rstrip("/")
        self._prefix = str(base.origin()) + self._path  # once, not per call
        self._lean = lean_pool
        self.head_timeout: float | None = None  # connect + upstream.timeout (open sets it)
        self.host = base.raw_authority  # what the upstream sees as Host
        # X-Forwarded-* trust and Location rewriting (Upstreams.open sets the config's)
        self.forwarding = Forwarding.build(base)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Upstream, *, where: str = "upstream",
                   trusted: tuple[str, ...] = ()) -> AsyncIterator[Forwarder]:
        url = URL(cfg.url)
        tls = None
        if url.scheme == "https":
            tls = upstream_tls.client_context(cfg.tls, where=where)
            upstream_tls.warn_if_unverified(cfg.tls, url=cfg.url, where=where)
        connector = upstream_conns.connector(limit=cfg.max_connections, keepalive_timeout=4,
                                             enable_cleanup_closed=True,
                                             ssl=tls if tls is not None else True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                        connect=cfg.connect_timeout, sock_read=cfg.timeout)
        # No cookie jar: the session is shared by every client, so a jar would send one
        # client's Set-Cookie upstream with the next client's requests.
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            max_line_size=MAX_FIELD, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as session:
            # aiohttp re-sends PUT/DELETE on a pooled connection that turns out dead, after
            # the upstream may already have run it. The promise is one execution: never.
            # (Private attribute; aiohttp's own test client sets it the same way.)
            if not hasattr(session, "_retry_connection"):
                raise RuntimeError("aiohttp changed: cannot turn off connection retries")
            session._retry_connection = False
            pool = None
            if url.scheme == "http" and url.host is not None:
                pool = lean.UpstreamPool(
                    url.host, url.port or 80, max_connections=cfg.max_connections,
                    connect_timeout=cfg.connect_timeout, read_timeout=cfg.timeout)
            try:
                forwarder = cls(session, url, pool, tls=tls,
                                server_name=cfg.tls.server_name or None,
                                connect_timeout=cfg.connect_timeout)
                forwarder.head_timeout = cfg.connect_timeout + cfg.timeout
                forwarder.forwarding = Forwarding.build(
                    url, trusted=trusted, rewrite_location=cfg.rewrite_location)
                yield forwarder
            finally:
                if pool is not None:
                    await pool.close()

    def sends_whole(self, method: str) -> bool:
        """Whether a whole body for `method` goes through our own client (plain HTTP)."""
        return self._lean is not None and method not in _AIOHTTP_ONLY

    async def send(self, *, method: str, raw_path: str, raw_query: str,
                   headers: CIMultiDict[str],
                   body: bytes | AsyncIterable[bytes] | None) -> UpstreamResponse:
        tail = raw_path + (f"?{raw_query}" if raw_query else "")
        # The proxy answers Expect itself (framing.continue_if_expected); forwarded, an
        # upstream that never sends 100 Continue would hold aiohttp's client forever.
        headers.popall("Expect", None)
        trace = tracectx.CURRENT.get()  # None unless tracing is on (proxy/tracectx.py)
        if trace is not None:
            trace.outgoing(method, headers)
        if self._lean is not None and (body is None or isinstance(body, bytes)) \
                and method not in _AIOHTTP_ONLY:
            try:
                r = await self._lean.request(method, self._path + tail, headers.items(),
                                             body)
            except ValueError:
                pass  # refused before sending (say, raw non-ASCII in the path): aiohttp's turn
            except FAILURES as exc:
                raise translate(exc) from exc
            else:
                return UpstreamResponse.of(r.status, r.reason, r.headers, r.content_length, r)
        # aiohttp's sock_read restarts with every byte, so an upstream sending 1xx after
        # 1xx would hold the request for ever: one deadline for the final head, as our own
        # client keeps. Not for streamed uploads, whose sending may rightly take longer.
        deadline = None if isinstance(body, AsyncIterable) else self.head_timeout
        try:
            async with asyncio.timeout(deadline):
                raw = await self._session.request(
                    method, URL(self._prefix + tail, encoded=True), headers=headers,
                    data=body, allow_redirects=False, compress=False,
                    server_hostname=self.server_name)
        except FAILURES as exc:
            raise translate(exc, tls=self.tls is not None) from exc
        return UpstreamResponse.of(raw.status, raw.reason, raw.headers, raw.content_length,
                                   _AiohttpBody(raw))


_AIOHTTP_ONLY = frozenset({"HEAD", "CONNECT"})  # not in the lean client's scope
