"""Small unguarded uploads take our own upstream client (issue #19), over real sockets:
a body of declared length up to SMALL_UPLOAD is read whole and sent on the lean pool's
keep-alive connection (the one GETs use); larger or chunked bodies still stream, byte for
byte, through aiohttp's client. Which client carried a request shows in which upstream
connection it arrived on: the two clients keep separate pools."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from proxy.sizes import SMALL_UPLOAD
from tests.conftest import ProxyHandle
from tests.test_edge import expect_exchange, port_of, read_answer
from tests.upstream import pattern

ROUTES = """
- name: guarded
  match: {methods: [POST], path: /guarded}
"""
LIMITS = "client:\n  body_timeout: 1s\n"


@dataclass
class Seen:
    conn: int  # which upstream connection the request arrived on
    head: bytes
    body: bytes


@dataclass
class ConnUpstream:
    """An upstream that records each request with the connection it came on."""

    seen: list[Seen] = field(default_factory=list)
    heads: list[bytes] = field(default_factory=list)  # as they arrive, before any body
    port: int = 0
    _conns: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns += 1
        conn = self._conns
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                body = await read_request_body(reader, head)
                self.seen.append(Seen(conn, head, body))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def read_request_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    if re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")  # the empty trailer section
        return body
    m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return await reader.readexactly(int(m.group(1))) if m else b""


@pytest.fixture
async def conn_upstream() -> AsyncIterator[ConnUpstream]:
    up = ConnUpstream()
    server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    yield up
    server.close()


async def exchange(port: int, method: str, target: str, *, body: bytes | None = None,
                   chunks: list[bytes] | None = None, pause: float = 0.0) -> int:
    """One request on a fresh client connection; with `chunks`, chunked; with `pause`,
    the body follows the head only after it. Returns the final status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test", "Connection: close"]
        if chunks is not None:
            lines.append("Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        else:
            payload = body or b""
            lines.append(f"Content-Length: {len(payload)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if pause:
            await writer.drain()
            await asyncio.sleep(pause)
        writer.write(payload)
        return (await read_answer(reader)).status
    finally:
        writer.close()


async def proxy_for(make_proxy: Callable[..., Awaitable[ProxyHandle]], up: ConnUpstream,
                    extra: str = "") -> int:
    p = await make_proxy(ROUTES, extra=extra, upstream_url=f"http://127.0.0.1:{up.port}")
    return port_of(p.url)


async def test_small_bodies_share_the_connection_gets_use(make_proxy, conn_upstream):
    """GET, a small POST, PUT and PATCH (unrouted and unguarded), GET again: all on one
    upstream connection, so the bodies went through our own client, each sent whole."""
    port = await proxy_for(make_proxy, conn_upstream)
    assert await exchange(port, "GET", "/a") == 200
    bodies = {"POST": pattern(1000), "PUT": pattern(SMALL_UPLOAD), "PATCH": b"{}"}
    for method, body in bodies.items():
        assert await exchange(port, method, f"/{method.lower()}", body=body) == 200
    assert await exchange(port, "POST", "/slow", body=pattern(5000), pause=0.1) == 200
    assert await exchange(port, "GET", "/b") == 200
    seen = conn_upstream.seen
    assert {s.conn for s in seen} == {seen[0].conn} and len(seen) == 6
    assert [s.body for s in seen[1:5]] == [*bodies.values(), pattern(5000)]


@pytest.mark.parametrize("shape", ["large", "chunked"])
async def test_a_large_or_chunked_upload_still_streams_byte_for_byte(make_proxy,
                                                                    conn_upstream, shape):
    """A body over SMALL_UPLOAD, or chunked, goes through aiohttp's client (not the GETs'
    connection) and arrives byte for byte."""
    port = await proxy_for(make_proxy, conn_upstream)
    assert await exchange(port, "GET", "/a") == 200
    body = pattern(3 * 2**20 + 7)
    if shape == "large":
        assert await exchange(port, "POST", "/up", body=body) == 200
    else:
        pieces = [body[i:i + 100_000] for i in range(0, len(body), 100_000)]
        assert await exchange(port, "POST", "/up", chunks=pieces) == 200
    get, upload = conn_upstream.seen
    assert upload.conn != get.conn and upload.body == body


async def test_a_small_upload_with_expect_gets_100_continue(make_proxy, conn_upstream):
    """Expect: 100-continue on a small unguarded POST: 100, then the answer; the body goes
    through our own client and the upstream never sees Expect."""
    port = await proxy_for(make_proxy, conn_upstream)
    assert await exchange(port, "GET", "/a") == 200
    got, sent = await expect_exchange(port, "/up", {}, b"e" * 2000)
    assert sent and got.statuses == [100, 200]
    get, upload = conn_upstream.seen
    assert upload.conn == get.conn and upload.body == b"e" * 2000
    assert b"expect" not in upload.head.lower()


async def test_a_stalled_small_upload_gets_408_and_is_never_sent(make_proxy, conn_upstream):
    """A small unguarded body that stops halfway: 408 after client.body_timeout, and the
    upstream receives nothing of it (it is read whole before the one send)."""
    port = await proxy_for(make_proxy, conn_upstream, LIMITS)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 400)
    async with asyncio.timeout(15):
        data = await reader.read()
    writer.close()
    assert data.startswith(b"HTTP/1.1 408 ") and b"body-timeout" in data
    assert conn_upstream.heads == []


async def test_a_client_gone_mid_body_is_no_internal_error(make_proxy, conn_upstream,
                                                           caplog):
    """A client that hangs up halfway through a small body: nothing is sent upstream and
    nothing is logged as an internal error (no traceback)."""
    caplog.set_level(logging.INFO)
    port = await proxy_for(make_proxy, conn_upstream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"a" * 400)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    for _ in range(50):  # until the proxy has seen the hang-up and logged its refusal
        if any(r.getMessage() == "request refused" for r in caplog.records):
            break
        await asyncio.sleep(0.05)
    assert conn_upstream.heads == []
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any(r.getMessage() == "request refused" for r in caplog.records)


async def test_a_small_upload_streams_when_body_memory_is_full(make_proxy, conn_upstream):
    """With client.max_body_memory smaller than the body, a small unguarded upload still
    goes through (streamed, holding nothing) instead of a 503 or a buffered copy."""
    port = await proxy_for(make_proxy, conn_upstream, "client:\n  max_body_memory: 1KiB\n")
    assert await exchange(port, "GET", "/a") == 200
    assert await exchange(port, "POST", "/up", body=pattern(4000), pause=0.1) == 200
    get, upload = conn_upstream.seen
    assert upload.conn != get.conn and upload.body == pattern(4000)
