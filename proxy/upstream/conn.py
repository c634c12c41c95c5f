"""One keep-alive connection of the upstream leg's own HTTP/1.1 client
(proxy/upstream/client.py): an asyncio.Protocol that writes a request once and parses
the answer with llhttp, strict, pausing reads above HIGH_WATER unread bytes."""

from __future__ import annotations

import asyncio
import select
from collections import deque
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http.http1 import BARE_CR, OBS_FOLD, head_end


class ConnPool(Protocol):
    """The pool a connection goes back to (upstream_client.UpstreamPool)."""

    read_timeout: float

    def _forget_idle(self, conn: Conn) -> None: ...
    def _release(self, conn: Conn, *, reuse: bool) -> None: ...


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


def decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Conn(asyncio.Protocol):
    """One upstream connection, and the exchange in progress on it while lent."""

    transport: asyncio.Transport

    def __init__(self, pool: ConnPool) -> None:
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
        # body to EOF as well. proxy/upstream/transfer.py undoes the coding.
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
