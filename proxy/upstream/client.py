"""A lean HTTP/1.1 client for the upstream leg: plain HTTP, whole request bodies, no HEAD.

Why not aiohttp's ClientSession: per small request it costs ~53 µs of CPU here against
~12 µs for a keep-alive asyncio.Protocol, and the proxy forwards every first request once.
This client keeps only what that needs; aiohttp stays for HTTPS, streamed bodies and HEAD.
Responses are parsed by llhttp (httptools), strict: no leniency is turned on.

The rules it keeps:
- A request is written once, in one `transport.write`, and never again on any failure.
  Failing before that write raises NotSent (the upstream cannot have acted); failing after
  raises SentFailure (or ReadTimeout): the outcome is unknown.
- We frame: Content-Length from the body, the caller's framing headers dropped, and a
  method, target, header name or value that could split the message is a ValueError.
- A connection is lent again only if its last response ended (on the wire) keep-alive
  over HTTP/1.1, it sat idle under `keepalive` seconds, and the server neither closed it
  nor sent a byte meanwhile, read or still unread on the socket. Anything doubtful is
  closed.
- At most ~1 MiB of unread body is buffered: reading pauses above that.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable

from multidict import CIMultiDictProxy

from proxy.errors import describe
from proxy.http.http1 import encode_request
from proxy.http.http1 import head_end as _head_end  # noqa: F401 - the name its unit test uses
from proxy.upstream.conn import (
    HIGH_WATER,
    LOW_WATER,
    MAX_FIELD,
    MAX_HEAD,
    MAX_HEADERS,
    BadAnswer,
    Conn,
    NotSent,
    ReadTimeout,
    SentFailure,
    decode,
)
from proxy.upstream.conn import Conn as _Conn  # noqa: F401 - the name its unit tests use

__all__ = ["HIGH_WATER", "LOW_WATER", "MAX_FIELD", "MAX_HEAD", "MAX_HEADERS", "BadAnswer",
           "LeanResponse", "NotSent", "ReadTimeout", "SentFailure", "UpstreamPool",
           "encode_request"]
from proxy.sizes import CHUNK
from proxy.slots import Slots


class LeanResponse:
    """The final response; the body is read off the connection as it arrives."""

    def __init__(self, conn: Conn) -> None:
        self.status = conn.status
        self.reason = decode(conn.reason)
        self.headers: CIMultiDictProxy[str] = conn.headers
        self.content_length = conn.content_length
        self._conn: Conn | None = conn

    async def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        """The body as it arrives; SentFailure if the connection fails before its end."""
        while (conn := self._conn) is not None:
            if conn.body:
                yield conn.take(size)
            elif conn.complete:
                self.close()
            elif conn.error is not None:
                self.close()
                raise conn.error
            else:
                try:
                    await conn.wait(conn.pool.read_timeout)
                except BaseException:  # cancelled: mid-message, so never reused
                    self._conn = None
                    conn.pool._release(conn, reuse=False)
                    raise

    def arrived(self) -> bytes | None:
        """The whole body if the message has ended (the connection goes back), else None."""
        conn = self._conn
        if conn is None or not conn.complete:
            return None
        data = conn.take(conn.buffered)
        self.close()
        return data

    async def read(self) -> bytes:
        data = self.arrived()  # the usual case: it is all here
        if data is not None:
            return data
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """The connection back to the pool if the message ended keep-alive; else closed.
        Call it always: an unclosed response holds its connection's slot."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool._release(conn, reuse=conn.complete and conn.keep_alive)


class UpstreamPool:
    """Keep-alive connections to one host: at most `max_connections`, waiters FIFO."""

    def __init__(self, host: str, port: int, *, max_connections: int, connect_timeout: float,
                 read_timeout: float, keepalive: float = 4.0) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.host, self.port = host, port
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.keepalive = keepalive
        self._slots: Slots[Conn] = Slots(max_connections, keep_idle=self._keep_idle)
        self._idle: deque[Conn] = deque()  # the most recently used on the right
        self._open: set[Conn] = set()
        self._closed = False

    async def request(self, method: str, target: str, headers: Iterable[tuple[str, str]],
                      body: bytes | None) -> LeanResponse:
        data = encode_request(method, target, headers, body)
        conn = self._idle_conn() or await self._acquire()
        conn.start()
        conn.active = True
        deadline = time.monotonic() + self.read_timeout
        try:
            conn.transport.write(data)  # from here on, the upstream may act on it
            while not conn.head_done:  # interim (1xx) heads do not restart the clock
                if conn.error is not None:
                    raise conn.error
                await conn.wait(deadline - time.monotonic())
        except BaseException as exc:
            self._release(conn, reuse=False)
            if isinstance(exc, Exception) and not isinstance(exc, SentFailure):
                raise SentFailure(describe(exc)) from exc
            raise
        return LeanResponse(conn)

    async def close(self) -> None:
        """Close idle and lent connections; waiters get NotSent."""
        self._closed = True
        self._slots.fail_waiters(lambda: NotSent("the upstream connection pool is closed"))
        for conn in list(self._open):
            conn.fail(SentFailure("the upstream connection pool was closed"))
        self._open.clear()
        self._idle.clear()
        self._slots.used = 0
        await asyncio.sleep(0)  # let the transports call connection_lost

    def _idle_conn(self) -> Conn | None:
        """The most recently used idle connection still fit to lend, if any (no await)."""
        if self._closed:
            return None
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.usable() and now - conn.idle_since < self.keepalive and conn.quiet():
                return conn
            self._drop(conn)
        return None

    async def _acquire(self) -> Conn:
        if self._closed:
            raise NotSent("the upstream connection pool is closed")
        if (conn := self._idle_conn()) is not None:
            return conn
        if self._slots.claim():
            return await self._connect()
        try:
            got = await self._slots.wait(self.connect_timeout)
        except TimeoutError:
            raise NotSent(f"no upstream connection free within "
                          f"{self.connect_timeout:g}s") from None
        if got is not None and got.usable() and got.quiet():
            return got
        if got is not None:  # it broke on its way to us: its slot is ours
            self._open.discard(got)
            got.shut()
        return await self._connect()

    async def _connect(self) -> Conn:
        """Open a connection into a slot already counted."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Conn(self), self.host, self.port)
        except BaseException as exc:
            self._slots.hand_over(None)
            if isinstance(exc, TimeoutError):  # before OSError: it is one
                raise NotSent(f"connecting to the upstream timed out "
                              f"({self.connect_timeout:g}s)") from None
            if isinstance(exc, OSError):
                raise NotSent(f"cannot connect to the upstream: {describe(exc)}") from exc
            raise
        if self._closed or not conn.usable():  # closed, or the server spoke first
            conn.shut()
            self._slots.hand_over(None)
            raise NotSent("the upstream connection closed before the request was written")
        self._open.add(conn)
        return conn

    def _release(self, conn: Conn, *, reuse: bool) -> None:
        conn.active = False
        if not (reuse and conn.usable() and not self._closed):
            self._drop(conn)
            return
        if conn.paused:  # so that an EOF while idle is noticed
            conn.paused = False
            conn.transport.resume_reading()
        self._slots.hand_over(conn)

    def _keep_idle(self, conn: Conn) -> None:
        """A connection given back with nobody waiting for it."""
        now = conn.idle_since = time.monotonic()
        self._idle.append(conn)
        while self._idle and now - self._idle[0].idle_since >= self.keepalive:
            self._drop(self._idle.popleft())  # stale at the bottom of the stack

    def _drop(self, conn: Conn) -> None:
        """Close a connection given back or idle, and free its slot."""
        conn.shut()
        if conn in self._open:
            self._open.discard(conn)
            self._slots.hand_over(None)

    def _forget_idle(self, conn: Conn) -> None:
        """An idle connection was closed by the server, or it sent stray bytes."""
        if conn in self._idle:
            self._idle.remove(conn)
            self._drop(conn)
