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
import select
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import describe
from proxy.http1 import BARE_CR, OBS_FOLD, encode_request, head_end
from proxy.http1 import head_end as _head_end  # noqa: F401 - the name its unit test uses
from proxy.sizes import CHUNK
from proxy.slots import Slots


class NotSent(Exception):
    """Failed before any byte of the request was written: the upstream cannot have acted."""


class SentFailure(Exception):
    """Failed after the request was (or may have been) written: the outcome is unknown."""


class ReadTimeout(SentFailure):
    """No final response head, or no next body bytes, within read_timeout."""


class BadAnswer(SentFailure):
    """The upstream answered, but with a head the proxy cannot relay: it acted."""


HIGH_WATER = 1024 * 1024  # unread body bytes above which reading pauses...
LOW_WATER = 256 * 1024  # ...and at or below which it resumes
MAX_FIELD = 64 * 1024  # one header line (or the status line); aiohttp's client: the same
MAX_HEADERS = 128  # header fields in one head; aiohttp's client: the same
MAX_HEAD = (MAX_HEADERS + 1) * (MAX_FIELD + 2) + 2  # what those two limits allow at most
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


def _chunked_last(values: list[str]) -> bool:
    codings = [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
    return bool(codings) and codings[-1] == "chunked"


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Conn(asyncio.Protocol):
    """One upstream connection, and the exchange in progress on it while lent."""

    transport: asyncio.Transport

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.active = False  # lent
        self.broken = False  # closed, EOF, stray bytes or failed: never lent again
        self.paused = False
        self.idle_since = 0.0
        self.waiter: asyncio.Future[None] | None = None
        self._unread: select.poll | None = None
        self.start()

    def start(self) -> None:
        """Fresh exchange state, for a new request."""
        self.head_done = self.complete = self.keep_alive = self.close_delimited = False
        self.error: SentFailure | None = None
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.content_length: int | None = None
        self.headers = _NO_HEADERS
        self.body: deque[bytes] = deque()
        self.buffered = 0
        self.head_buf = b""

    def usable(self) -> bool:
        return not self.broken and not self.transport.is_closing()

    def shut(self) -> None:
        self.broken = True
        self.transport.abort()  # what is still queued for sending is dropped

    def fail(self, exc: SentFailure) -> None:
        """End the exchange with `exc` (the first failure wins) and close."""
        if self.active and not self.complete and self.error is None:
            self.error = exc
        self.shut()
        self.wake()

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        """Until the parser has news for the reader, or the exchange fails."""
        fut = self.waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, self._timed_out, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self.waiter = None

    def _timed_out(self, fut: asyncio.Future[None]) -> None:
        if not fut.done():
            self.fail(ReadTimeout("the upstream sent nothing within the read timeout"))

    def take(self, size: int) -> bytes:
        """About `size` buffered body bytes (the last piece taken may overshoot)."""
        parts: list[bytes] = []
        n = 0
        while self.body and n < size:
            parts.append(self.body.popleft())
            n += len(parts[-1])
        self.buffered -= n
        if self.paused and self.buffered <= LOW_WATER:
            self.paused = False
            self.transport.resume_reading()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and hasattr(select, "poll"):
            self._unread = select.poll()  # registered once: ~2 µs a look (quiet())
            self._unread.register(sock.fileno(), select.POLLIN)

    def quiet(self) -> bool:
        """No byte (nor EOF) waits unread on the socket. Asked before a kept-alive
        connection is lent again: bytes the loop has not read yet (a stray answer that
        arrived in the same loop iteration as the connection was given back) would be
        read as the next request's answer, perhaps another tenant's. Only while the
        transport is open, so the descriptor polled is still this connection's."""
        return self._unread is None or not self._unread.poll(0)

    def data_received(self, data: bytes) -> None:
        if not self.active or self.complete:  # nobody asked: the connection is out of step
            self._lost()
            return
        try:
            while not self.head_done and data:  # heads (1xx ones too) are fed whole
                data = self._feed_head(data)
            if data:
                self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # bytes after the response: it stands, the connection not
                self.shut()
                return
            cause = exc.__context__  # what our callback raised, if it was us
            self.fail(cause if isinstance(cause, SentFailure)
                      else BadAnswer(f"malformed response from the upstream: {exc}"))
        except BadAnswer as exc:
            self.fail(exc)

    def _feed_head(self, data: bytes) -> bytes:
        """Buffer a head until its blank line, check the limits aiohttp's client also
        keeps, refuse bare CRs and unfold obs-fold (RFC 9112 §2.2, §5.2), then feed it;
        returns the bytes after it (b"" while the head is still incomplete)."""
        buf = self.head_buf + data if self.head_buf else data
        end = head_end(buf)
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise BadAnswer("the upstream's response head is too large")
            self.head_buf = buf
            return b""
        head, rest = buf[:end], buf[end:]
        self.head_buf = b""
        if BARE_CR.search(head):
            raise BadAnswer("the upstream's response head has a bare CR")
        if b"\n " in head or b"\n\t" in head:
            head = OBS_FOLD.sub(b"", head)
        # head.split(b"\n") has the status line, the fields and two more pieces
        if head.count(b"\n") - 2 > MAX_HEADERS or (
                len(head) > MAX_FIELD + 1
                and any(len(x) > MAX_FIELD + 1 for x in head.split(b"\n"))):
            raise BadAnswer("the upstream's response head is over the header limits "
                            f"({MAX_HEADERS} fields of at most {MAX_FIELD} bytes)")
        self.parser.feed_data(head)
        return rest

    def eof_received(self) -> bool:
        self._lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def _lost(self) -> None:
        if self.active and self.close_delimited and self.error is None:
            self.complete = True  # the body ran to EOF, as its head said it would
        self.fail(SentFailure("the upstream closed the connection before the response ended"))
        if not self.active:
            self.pool._forget_idle(self)

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.head_done:
            raise SentFailure("bytes after the response")  # stops the parser
        self.reason = b""
        self.raw_headers = []

    def on_status(self, status: bytes) -> None:
        self.reason += status  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.head_done:  # trailers are dropped
            self.raw_headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        headers = CIMultiDict([(n.decode("utf-8", "surrogateescape"),
                                v.decode("utf-8", "surrogateescape"))
                               for n, v in self.raw_headers])
        framed = "Content-Length" in headers or "Transfer-Encoding" in headers
        if self.parser.get_http_version() not in ("1.1", "1.0") or not 100 <= status <= 599:
            raise BadAnswer(f"the upstream sent an invalid status line ({status})")
        if status == 101:
            raise BadAnswer("the upstream switched protocols (101)")
        if status < 200:
            if framed:  # llhttp would read a body for some 1xx; RFC 9110 says there is none
                raise BadAnswer(f"the upstream sent a {status} with a body")
            return  # interim: skipped, the final response follows
        length = headers.get("Content-Length")
        self.status, self.content_length = status, None if length is None else int(length)
        self.headers = CIMultiDictProxy(headers)
        # EOF ends a body if the head has no framing at all, or (RFC 9112 §6.3) a
        # Transfer-Encoding whose last coding is not chunked (`gzip`): llhttp reads such a
        # body to EOF as well. proxy/transfer.py undoes the coding.
        te = headers.getall("Transfer-Encoding", [])
        self.close_delimited = status not in (204, 304) and (
            not _chunked_last(te) if te else "Content-Length" not in headers)
        self.head_done = True
        self.wake()

    def on_body(self, body: bytes) -> None:
        if not self.head_done:
            raise SentFailure("the upstream sent a body before the final head")
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused:
            self.paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True
            self.keep_alive = (self.parser.should_keep_alive()
                               and self.parser.get_http_version() == "1.1")
        self.wake()  # after an interim response, the wait for the head starts over


class LeanResponse:
    """The final response; the body is read off the connection as it arrives."""

    def __init__(self, conn: _Conn) -> None:
        self.status = conn.status
        self.reason = _decode(conn.reason)
        self.headers: CIMultiDictProxy[str] = conn.headers
        self.content_length = conn.content_length
        self._conn: _Conn | None = conn

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
        self._slots: Slots[_Conn] = Slots(max_connections, keep_idle=self._keep_idle)
        self._idle: deque[_Conn] = deque()  # the most recently used on the right
        self._open: set[_Conn] = set()
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

    def _idle_conn(self) -> _Conn | None:
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

    async def _acquire(self) -> _Conn:
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

    async def _connect(self) -> _Conn:
        """Open a connection into a slot already counted."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self), self.host, self.port)
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

    def _release(self, conn: _Conn, *, reuse: bool) -> None:
        conn.active = False
        if not (reuse and conn.usable() and not self._closed):
            self._drop(conn)
            return
        if conn.paused:  # so that an EOF while idle is noticed
            conn.paused = False
            conn.transport.resume_reading()
        self._slots.hand_over(conn)

    def _keep_idle(self, conn: _Conn) -> None:
        """A connection given back with nobody waiting for it."""
        now = conn.idle_since = time.monotonic()
        self._idle.append(conn)
        while self._idle and now - self._idle[0].idle_since >= self.keepalive:
            self._drop(self._idle.popleft())  # stale at the bottom of the stack

    def _drop(self, conn: _Conn) -> None:
        """Close a connection given back or idle, and free its slot."""
        conn.shut()
        if conn in self._open:
            self._open.discard(conn)
            self._slots.hand_over(None)

    def _forget_idle(self, conn: _Conn) -> None:
        """An idle connection was closed by the server, or it sent stray bytes."""
        if conn in self._idle:
            self._idle.remove(conn)
            self._drop(conn)
