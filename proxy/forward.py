"""The upstream leg. Owns the aiohttp ClientSession; sends each request exactly once.

Errors map to problems in exactly one function, `_translate`: a failure before the request
was written (connection refused, connect timeout) means no effect happened (`sent=False`);
any failure after that means the upstream may have acted (`sent=True`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import Upstream
from proxy.errors import ProblemError, UpstreamFailed, UpstreamTimeout, UpstreamUnreachable

CHUNK = 256 * 1024


class UpstreamError(Exception):
    """An upstream failure: `problem` is what the client gets; `sent` if it may have acted."""

    def __init__(self, problem: ProblemError, *, sent: bool) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.sent = sent


def _translate(exc: BaseException) -> UpstreamError:
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


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    raw: aiohttp.ClientResponse

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; failures mid-body raise UpstreamError(sent=True)."""
        try:
            async for chunk in self.raw.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _translate(exc) from exc

    async def read(self) -> bytes:
        """The whole body (for small ones of known length); failures as in `chunks`."""
        try:
            return await self.raw.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _translate(exc) from exc

    @property
    def content_length(self) -> int | None:
        return self.raw.content_length

    def close(self) -> None:
        self.raw.release()


class Forwarder:
    """Sends requests to the one configured upstream; a client can never pick another."""

    def __init__(self, session: aiohttp.ClientSession, base: URL) -> None:
        self._session = session
        self._base = base
        self._prefix = str(base.origin()) + base.raw_path.rstrip("/")  # once, not per call
        self.host = base.raw_authority  # what the upstream sees as Host

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Upstream) -> AsyncIterator[Forwarder]:
        connector = aiohttp.TCPConnector(limit=cfg.max_connections, keepalive_timeout=4,
                                         enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout,
                                        connect=cfg.connect_timeout, sock_read=cfg.timeout)
        # No cookie jar: the session is shared by every client, so a jar would send one
        # client's Set-Cookie upstream with the next client's requests.
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as session:
            # aiohttp re-sends PUT/DELETE on a pooled connection that turns out dead, after
            # the upstream may already have run it. The promise is one execution: never.
            # (Private attribute; aiohttp's own test client sets it the same way.)
            if not hasattr(session, "_retry_connection"):
                raise RuntimeError("aiohttp changed: cannot turn off connection retries")
            session._retry_connection = False
            yield cls(session, URL(cfg.url))

    def url_for(self, raw_path: str, raw_query: str) -> URL:
        return URL(self._prefix + raw_path + (f"?{raw_query}" if raw_query else ""),
                   encoded=True)

    async def send(self, *, method: str, url: URL, headers: CIMultiDict[str],
                   body: bytes | AsyncIterable[bytes] | None) -> UpstreamResponse:
        try:
            raw = await self._session.request(method, url, headers=headers, data=body,
                                              allow_redirects=False, compress=False)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise _translate(exc) from exc
        return UpstreamResponse(raw.status, raw.reason, raw.headers, raw)
