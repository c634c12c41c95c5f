"""The lean upstream client (proxy/upstream/client.py), against raw loopback servers that
write exact bytes: a request is written once and never again, framing is ours, responses
are parsed strictly, and a connection is reused only when it is certainly in step."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from proxy.upstream import client as upstream_client
from proxy.upstream.client import HIGH_WATER, NotSent, ReadTimeout, SentFailure, UpstreamPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HOST = [("Host", "up.test")]


class Raw:
    """A loopback server: `handler(server, reader, writer)` runs for each connection."""

    def __init__(self, handler: Callable[..., Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0
        self.open = self.peak_open = 0
        self.requests: list[bytes] = []
        self.eofs = 0  # connections the client closed
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            self.eofs += not exc.partial
            raise
        m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        request = head + (await reader.readexactly(int(m.group(1))) if m else b"")
        self.requests.append(request)
        return request

    async def until_eof(self, reader: asyncio.StreamReader) -> None:
        """Wait for the client to close this connection (stray bytes count as a failure)."""
        assert await reader.read() == b""
        self.eofs += 1


def respond(*responses: bytes, then_close: bool = False) -> Callable[..., Awaitable[None]]:
    """Answer the server's requests with `responses` in turn (the last repeats)."""
    async def handler(srv: Raw, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            await srv.read_request(reader)
            writer.write(responses[min(len(srv.requests), len(responses)) - 1])
            await writer.drain()
            if then_close:
                return
        await srv.until_eof(reader)
    return handler


Start = Callable[..., Awaitable[tuple[Raw, UpstreamPool]]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    """`await serve(handler, **pool_options)`: a raw server and a pool for it."""
    made: list[tuple[Raw, UpstreamPool]] = []

    async def start(handler: Callable[..., Awaitable[None]], **kw: float) -> tuple[Raw,
                                                                                 UpstreamPool]:
        srv = Raw(handler)
        await srv.start()
        options = {"max_connections": 4, "connect_timeout": 1.0, "read_timeout": 2.0} | kw
        pool = UpstreamPool("127.0.0.1", srv.port, **options)
        made.append((srv, pool))
        return srv, pool

    yield start
    for srv, pool in made:
        await pool.close()
        srv.server.close()
        for task in srv.tasks:
            task.cancel()
        await asyncio.gather(*srv.tasks, return_exceptions=True)


async def get(pool: UpstreamPool, method: str = "POST", body: bytes | None = b"{}",
              headers: list[tuple[str, str]] = HOST) -> tuple[int, bytes]:
    resp = await pool.request(method, "/x", headers, body)
    return resp.status, await resp.read()


async def settle() -> None:
    """Let the loop deliver what the sockets have (EOFs, stray bytes)."""
    await asyncio.sleep(0.05)


# --- requests: our framing, one write -----------------------------------------------------

async def test_request_goes_out_in_one_write_with_our_framing(serve, monkeypatch):
    """Caller framing headers are dropped, Content-Length comes from the body, order kept."""
    writes: list[bytes] = []

    class Spy:
        def __init__(self, transport):
            self._t = transport

        def write(self, data):
            writes.append(bytes(data))
            self._t.write(data)

        def __getattr__(self, name):
            return getattr(self._t, name)

    made = upstream_client._Conn.connection_made
    monkeypatch.setattr(upstream_client._Conn, "connection_made",
                        lambda self, t: made(self, Spy(t)))
    srv, pool = await serve(respond(OK))
    headers = [("Host", "up.test"), ("X-A", "1"), ("Content-Length", "999"),
               ("Transfer-Encoding", "chunked"), ("connection", "keep-alive"),
               ("Keep-Alive", "timeout=9"), ("X-A", "2")]
    assert await get(pool, "POST", b'{"amount": 100}', headers) == (200, b"ok")
    expected = (b'POST /x HTTP/1.1\r\nHost: up.test\r\nX-A: 1\r\nX-A: 2\r\n'
                b'Content-Length: 15\r\n\r\n{"amount": 100}')
    assert writes == [expected]
    assert srv.requests == [expected]


@pytest.mark.parametrize("method, body, length", [
    ("GET", None, None), ("DELETE", None, None), ("OPTIONS", None, None),
    ("POST", None, b"0"), ("POST", b"", b"0"), ("PUT", b"", b"0"), ("PATCH", b"", b"0"),
    ("PATCH", b"xyz", b"3"), ("GET", b"", b"0"), ("DELETE", b"ab", b"2"),
])
async def test_content_length_is_sent_unless_a_bodyless_get_delete_or_options(
        serve, method, body, length):
    """Content-Length is the body length (0 if none), omitted for bodyless GET, DELETE, OPTIONS."""
    srv, pool = await serve(respond(OK))
    await get(pool, method, body)
    m = re.search(rb"\r\nContent-Length: (\d+)\r\n", srv.requests[0])
    assert (m.group(1) if m else None) == length
    assert srv.requests[0].endswith(b"\r\n\r\n" + (body or b""))


@pytest.mark.parametrize("method, target, headers", [
    ("PO ST", "/x", HOST), ("", "/x", HOST), ("POST\r\n", "/x", HOST), ("PÖST", "/x", HOST),
    ("HEAD", "/x", HOST), ("head", "/x", HOST), ("CONNECT", "up.test:443", HOST),
    ("POST", "/x y", HOST), ("POST", "/x\r\nX: 1", HOST), ("POST", "", HOST),
    ("POST", "/é", HOST), ("POST", "/x\x7f", HOST),
    ("POST", "/x", [("X A", "1")]), ("POST", "/x", [("X:A", "1")]),
    ("POST", "/x", [("", "1")]),
    ("POST", "/x", [("X-\u00e9", "1")]), ("POST", "/x", [("X-A", "1\r\nX-B: 2")]),
    ("POST", "/x", [("X-A", "1\n")]), ("POST", "/x", [("X-A", "a\rb")]),
    ("POST", "/x", [("X-A", "a\x00b")]), ("POST", "/x", [("X-A", "\ud800")]),
    ("POST", "/x", [("X-A", "1"), ("X-B", "2\r\n")]),
    ("POST", "/x", [("Connection", "close\r\nX-B: 2")]),  # one we drop and frame ourselves
])
async def test_anything_that_could_split_the_request_raises_before_connecting(
        serve, method, target, headers):
    """A bad method, target or header (one that could split the request) fails before connecting."""
    srv, pool = await serve(respond(OK))
    with pytest.raises(ValueError):
        await pool.request(method, target, headers, b"")
    await settle()
    assert srv.connections == 0


async def test_header_values_are_sent_utf8_with_surrogateescape(serve):
    """Header values go out as UTF-8; surrogate-escaped characters go out as their raw bytes."""
    srv, pool = await serve(respond(OK))
    await get(pool, headers=HOST + [("X-Name", "café \udcff")])
    assert b"\r\nX-Name: caf\xc3\xa9 \xff\r\n" in srv.requests[0]


# --- responses ----------------------------------------------------------------------------

def test_a_head_ends_at_its_first_blank_line_whatever_its_line_ends():
    """The head ends just past the first blank line (`\\r?\\n\\r?\\n`), for every spelling."""
    blank = re.compile(rb"\r?\n\r?\n")
    for n in range(9):
        for chars in itertools.product(b"a\r\n", repeat=n):
            buf = bytes(chars)
            m = blank.search(buf)
            assert upstream_client._head_end(buf) == (m.end() if m else -1), buf


async def test_head_keeps_order_duplicates_reason_and_undecodable_bytes(serve):
    """The parsed head keeps header order, case, duplicates, the reason and undecodable bytes."""
    srv, pool = await serve(respond(
        b"HTTP/1.1 201 Tr\xc3\xa8s Bien\r\nSet-Cookie: a=1\r\nX-Raw: caf\xc3\xa9 \xff  \r\n"
        b"set-cookie: b=2\r\nContent-Length: 5\r\n\r\nhello"))
    resp = await pool.request("POST", "/x", HOST, b"")
    assert (resp.status, resp.reason, resp.content_length) == (201, "Très Bien", 5)
    assert list(resp.headers.items()) == [
        ("Set-Cookie", "a=1"), ("X-Raw", "café \udcff"), ("set-cookie", "b=2"),
        ("Content-Length", "5")]
    assert resp.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert await resp.read() == b"hello"


async def test_chunked_body_is_decoded_as_it_arrives_and_the_connection_reused(serve):
    """A chunked body sent in pieces decodes whole, trailers dropped, its connection reused."""
    async def handler(srv, reader, writer):
        while True:
            await srv.read_request(reader)
            for part in (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
                         b"llo\r\n6;ext=1\r\n world\r\n", b"0\r\nX-Trailer: t\r\n\r\n"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.01)

    srv, pool = await serve(handler)
    for _ in range(2):
        resp = await pool.request("POST", "/x", HOST, b"")
        assert resp.content_length is None
        assert b"".join([c async for c in resp.chunks()]) == b"hello world"
        assert "X-Trailer" not in resp.headers
    assert srv.connections == 1


async def test_close_delimited_body_runs_to_eof_and_its_connection_is_not_reused(serve):
    """A body with neither length nor chunking is read to EOF, and its connection is not reused."""
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX: 1\r\n\r\nall of ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"it")

    srv, pool = await serve(handler)
    resp = await pool.request("POST", "/x", HOST, b"")
    assert resp.content_length is None
    assert await resp.read() == b"all of it"
    assert await get(pool) == (200, b"all of it")
    assert srv.connections == 2


async def test_a_transfer_coding_not_ending_in_chunked_runs_to_eof(serve):
    """RFC 9112 §6.3: `Transfer-Encoding: gzip` without chunked is read to EOF as a whole
    body, not a truncated one (its coding is undone by proxy/upstream/transfer.py)."""
    srv, pool = await serve(respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"
                                    b"coded bytes", then_close=True))
    assert await get(pool) == (200, b"coded bytes")
    assert len(srv.requests) == 1


@pytest.mark.parametrize("status", [204, 304])
async def test_204_and_304_have_no_body_and_keep_the_connection(serve, status):
    """A 204 or 304 without framing headers has an empty body and its connection is reused."""
    srv, pool = await serve(respond(
        f"HTTP/1.1 {status} X\r\nETag: e\r\n\r\n".encode(), OK))
    assert await get(pool) == (status, b"")
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 1


async def test_interim_responses_are_skipped(serve):
    """1xx interim responses are skipped: only the final response is returned, connection kept."""
    srv, pool = await serve(respond(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK))
    resp = await pool.request("POST", "/x", HOST, b"{}")
    assert (resp.status, resp.reason, "Link" in resp.headers) == (200, "OK", False)
    assert await resp.read() == b"ok"
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 1


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Early\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n",
    b"garbage\r\n\r\n",
    b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nA: 1\rB: 2\r\nContent-Length: 0\r\n\r\n",  # bare CR (obs-fold is
    # unfolded, as aiohttp's client does: tests/test_edge.py)
    b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 199 Odd\r\nContent-Length: 2\r\n\r\nok" + OK,
    b"HTTP/1.1 200 OK\r\nX: " + b"a" * 400_000 + b"\r\nContent-Length: 0\r\n\r\n",
])
async def test_malformed_response_is_sent_failure_and_its_connection_closed(serve, response):
    """A malformed response is a SentFailure: never re-sent, and its connection is closed."""
    srv, pool = await serve(respond(response, OK))
    with pytest.raises(SentFailure):
        await get(pool)
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 2
    assert len(srv.requests) == 2  # the failed one was not sent again


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Len",
    b"",
])
async def test_connection_closed_before_the_response_ends_is_sent_failure(serve, response):
    """A connection closed before the response is whole raises SentFailure; nothing is re-sent."""
    srv, pool = await serve(respond(response, then_close=True))
    with pytest.raises(SentFailure):
        await get(pool)
    assert len(srv.requests) == 1


async def test_bytes_after_a_complete_response_keep_it_but_not_the_connection(serve):
    """Stray bytes after a complete response leave it intact but its connection is not reused."""
    srv, pool = await serve(respond(OK + b"HTTP/1.1 200 OK\r\n", OK))
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 2


# --- keep-alive ---------------------------------------------------------------------------

@pytest.mark.parametrize("first, reused", [
    (OK, True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
])
async def test_connection_is_reused_only_after_a_keep_alive_http11_response(
        serve, first, reused):
    """A connection is reused only after an HTTP/1.1 response without Connection: close."""
    srv, pool = await serve(respond(first, OK))
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert srv.connections == (1 if reused else 2)


async def test_closing_a_response_early_reuses_only_a_connection_whose_body_has_ended(serve):
    """Closing a response early closes its connection if the body is unfinished, else reuses it."""
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfive!")  # 5 missing
        await srv.until_eof(reader)

    srv, pool = await serve(handler)
    (await pool.request("POST", "/x", HOST, b"")).close()  # body unfinished: closed
    await settle()
    assert srv.eofs == 1

    srv, pool = await serve(respond(b"HTTP/1.1 404 No\r\nContent-Length: 3\r\n\r\nno!"))
    (await pool.request("POST", "/x", HOST, b"")).close()  # body all here: reused
    assert await get(pool) == (404, b"no!")
    assert srv.connections == 1


async def test_idle_connection_the_server_closed_is_not_used(serve):
    """The server answers keep-alive, then closes: the next request goes on a new
    connection and reaches the server exactly once."""
    srv, pool = await serve(respond(OK, then_close=True))
    assert await get(pool) == (200, b"ok")
    await settle()
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 2 and len(srv.requests) == 2


async def test_idle_connection_past_keepalive_is_closed_not_used(serve):
    """A connection idle longer than keepalive is closed, and the next request opens a new one."""
    srv, pool = await serve(respond(OK), keepalive=0.05)
    assert await get(pool) == (200, b"ok")
    await asyncio.sleep(0.1)
    assert await get(pool) == (200, b"ok")
    await settle()
    assert (srv.connections, srv.eofs) == (2, 1)


async def test_idle_connection_that_sent_stray_bytes_is_not_used(serve):
    """An idle connection on which the server sent unsolicited bytes is not used again."""
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(OK)
        await asyncio.sleep(0.01)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
        if srv.connections == 1:
            await reader.read()
            return
        await respond(OK)(srv, reader, writer)

    srv, pool = await serve(handler)
    assert await get(pool) == (200, b"ok")
    await settle()
    assert await get(pool) == (200, b"ok")
    assert srv.connections == 2


# --- send once ----------------------------------------------------------------------------

async def test_connection_refused_is_not_sent():
    """A refused connect raises NotSent and gives its slot back for the next request."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        pool = UpstreamPool("127.0.0.1", port, max_connections=1, connect_timeout=1,
                            read_timeout=1)
        with pytest.raises(NotSent):
            await get(pool)
        with pytest.raises(NotSent):  # the slot was given back
            await get(pool)
        await pool.close()


async def test_connect_timeout_is_not_sent():
    """A listener whose backlog is full drops our SYN: the connect hangs until the timeout."""
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(0)
        port = ls.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for s in fillers:
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
        pool = UpstreamPool("127.0.0.1", port, max_connections=1, connect_timeout=0.1,
                            read_timeout=1)
        try:
            with pytest.raises(NotSent, match="timed out"):
                await get(pool)
        finally:
            await pool.close()
            for s in fillers:
                s.close()


async def test_waiting_for_a_free_connection_past_connect_timeout_is_not_sent(serve):
    """Waiting longer than connect_timeout for a free connection raises NotSent, never written."""
    async def stall(srv, reader, writer):
        await srv.read_request(reader)
        await srv.until_eof(reader)

    srv, pool = await serve(stall, max_connections=1, connect_timeout=0.1)
    first = asyncio.create_task(get(pool))
    await settle()
    with pytest.raises(NotSent, match="no upstream connection free"):
        await get(pool)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert len(srv.requests) == 1


@pytest.mark.parametrize("reused", [False, True])
async def test_connection_dropped_after_the_request_is_sent_failure_never_resent(
        serve, reused):
    """Fresh or pooled, a connection that dies unanswered is never written to again."""
    async def handler(srv, reader, writer):
        if reused:
            await srv.read_request(reader)
            writer.write(OK)
        await srv.read_request(reader)  # then drop it unanswered

    srv, pool = await serve(handler)
    if reused:
        assert await get(pool) == (200, b"ok")
    with pytest.raises(SentFailure) as info:
        await get(pool)
    assert not isinstance(info.value, ReadTimeout)
    await settle()
    assert (srv.connections, len(srv.requests)) == (1, 2 if reused else 1)


async def test_connection_dropped_mid_body_is_sent_failure_after_the_bytes_received(serve):
    """A connection dropped mid-body yields the bytes received, then SentFailure; no resend."""
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.02)

    srv, pool = await serve(handler)
    resp = await pool.request("POST", "/x", HOST, b"")
    got = []
    with pytest.raises(SentFailure):
        async for chunk in resp.chunks():
            got.append(chunk)
    assert got == [b"partial"] and len(srv.requests) == 1


# --- read timeout -------------------------------------------------------------------------

async def test_no_response_head_within_read_timeout_is_read_timeout(serve):
    """No complete head within read_timeout raises ReadTimeout and closes the connection."""
    async def stall(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # a head that never ends
        await srv.until_eof(reader)

    srv, pool = await serve(stall, read_timeout=0.1)
    with pytest.raises(ReadTimeout):
        await get(pool)
    await settle()
    assert (srv.eofs, len(srv.requests)) == (1, 1)


@pytest.mark.parametrize("head", [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\n\r\n"])  # the EOF we cause ends nothing
async def test_no_next_body_bytes_within_read_timeout_is_read_timeout(serve, head):
    """A body stalled longer than read_timeout raises ReadTimeout and closes the connection."""
    async def stall(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(head + b"abc")
        await srv.until_eof(reader)

    srv, pool = await serve(stall, read_timeout=0.1)
    resp = await pool.request("POST", "/x", HOST, b"")
    with pytest.raises(ReadTimeout):
        await resp.read()
    await settle()
    assert srv.eofs == 1


# --- flow control, limits, cancellation ---------------------------------------------------

async def test_big_body_buffers_at_most_about_a_mebibyte_for_a_slow_reader(serve, monkeypatch):
    """A 20 MiB body to a slow reader arrives intact, buffering at most HIGH_WATER plus one read."""
    size, piece = 20 * 2**20, bytes(range(256)) * 256
    peak = 0
    on_body = upstream_client._Conn.on_body

    def spy(self, body):
        nonlocal peak
        on_body(self, body)
        peak = max(peak, self.buffered)

    monkeypatch.setattr(upstream_client._Conn, "on_body", spy)

    async def big(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size // len(piece)):
            writer.write(piece)
            await writer.drain()
        await srv.until_eof(reader)

    srv, pool = await serve(big)
    resp = await pool.request("GET", "/big", HOST, None)
    got = hashlib.sha256()
    async for chunk in resp.chunks():
        got.update(chunk)
        await asyncio.sleep(0.002)
    assert got.digest() == hashlib.sha256(piece * (size // len(piece))).digest()
    assert HIGH_WATER < peak <= HIGH_WATER + 256 * 1024  # one socket read past the mark


async def test_a_paused_connection_given_back_still_notices_the_server_closing_it(serve):
    """A whole body above the high-water mark, left unread: reading resumes when the
    connection goes idle, so the server's later close is seen and it is not used."""
    body = b"x" * (HIGH_WATER + 100_000)

    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if srv.connections == 1:
            await asyncio.sleep(0.1)
            return  # closes
        await srv.until_eof(reader)

    srv, pool = await serve(handler)
    resp = await pool.request("POST", "/x", HOST, b"")
    await settle()
    resp.close()  # complete though unread: back to the pool
    await asyncio.sleep(0.15)
    assert await get(pool) == (200, body)
    assert srv.connections == 2 and len(srv.requests) == 2


async def test_at_most_max_connections_are_open(serve):
    """Ten concurrent requests all succeed without ever opening more than max_connections."""
    async def slow(srv, reader, writer):
        while True:
            await srv.read_request(reader)
            await asyncio.sleep(0.01)
            writer.write(OK)

    srv, pool = await serve(slow, max_connections=2)
    results = await asyncio.gather(*[get(pool) for _ in range(10)])
    assert results == [(200, b"ok")] * 10
    assert srv.peak_open == 2 and srv.connections == 2


async def test_waiters_are_served_in_arrival_order(serve):
    """Requests waiting for the one connection are sent in the order they were made."""
    srv, pool = await serve(respond(OK), max_connections=1)
    await asyncio.gather(*[get(pool, headers=HOST + [("X-N", str(i))]) for i in range(6)])
    served = [int(re.search(rb"X-N: (\d+)", r).group(1)) for r in srv.requests]
    assert served == list(range(6)) and srv.connections == 1


async def test_a_waiter_gets_the_slot_of_a_connection_that_was_closed(serve):
    """When a connection closes after Connection: close, its slot passes to the next waiter."""
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    srv, pool = await serve(respond(close, then_close=True), max_connections=1)
    assert await asyncio.gather(*[get(pool) for _ in range(3)]) == [(200, b"ok")] * 3
    assert srv.connections == 3


@pytest.mark.parametrize("where", ["head", "body"])
async def test_cancelled_request_closes_its_connection_and_frees_the_slot(serve, where):
    """A request cancelled while awaiting head or body closes its connection and frees its slot."""
    async def handler(srv, reader, writer):
        await srv.read_request(reader)
        if srv.connections == 1:  # the first one stalls
            if where == "body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
            await srv.until_eof(reader)
            return
        writer.write(OK)
        await srv.until_eof(reader)

    srv, pool = await serve(handler, max_connections=1)
    task = asyncio.create_task(get(pool))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await get(pool) == (200, b"ok")
    await settle()
    assert srv.eofs == 1 and srv.connections == 2


async def test_close_closes_idle_and_lent_connections(serve):
    """close() ends idle and lent connections: a pending read fails, later requests are NotSent."""
    async def handler(srv, reader, writer):
        first = srv.connections == 1
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc" if first else OK)
        await srv.until_eof(reader)

    srv, pool = await serve(handler)
    lent = await pool.request("POST", "/x", HOST, b"")
    reading = asyncio.create_task(lent.read())
    assert await get(pool) == (200, b"ok")  # on a second connection, now idle
    await settle()
    await pool.close()
    with pytest.raises(SentFailure):
        await reading
    with pytest.raises(NotSent):
        await get(pool)
    await settle()
    assert srv.eofs == 2


# --- a real server ------------------------------------------------------------------------

async def test_against_an_aiohttp_server():
    """Against real aiohttp, sized and chunked bodies and a 404 share one keep-alive connection."""
    peers: set[object] = set()

    async def echo(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport)
        return web.Response(body=await request.read(), status=201,
                            headers={"X-Got": request.headers.get("X-Send", "")})

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.add(request.transport)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(3):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    pool = UpstreamPool("127.0.0.1", port, max_connections=2, connect_timeout=1,
                        read_timeout=2)
    host = [("Host", f"127.0.0.1:{port}")]
    try:
        for i in range(5):
            resp = await pool.request("POST", "/echo?q=1", host + [("X-Send", f"v{i}")],
                                      b"x" * (i * 100_000))
            assert (resp.status, resp.headers["X-Got"]) == (201, f"v{i}")
            assert resp.content_length == i * 100_000
            assert await resp.read() == b"x" * (i * 100_000)
            resp = await pool.request("GET", "/stream", host, None)
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert await resp.read() == b"part0;part1;part2;"
        resp = await pool.request("POST", "/nowhere", host, b"")
        assert resp.status == 404 and await resp.read()
    finally:
        await pool.close()
        await runner.cleanup()
    assert len(peers) == 1  # one keep-alive connection for all of it
