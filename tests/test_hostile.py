"""Hostile HTTP/1.1 over raw sockets: ambiguous framing, smuggling shapes, bad headers.

Each request of the corpus must get a 4xx or a closed connection, with nothing reaching
the upstream that should not (no smuggled second request, ever); absolute-form targets
and foreign Host headers may be served, but only ever by the configured upstream. After
each, a normal request on a fresh connection is served correctly.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from tests.upstream import TestUpstream

REJECT = "reject"  # a 4xx or a close; the upstream sees nothing
UPSTREAM_ONLY = "upstream-only"  # may be served, but only by the configured upstream
NOT_IMPLEMENTED = "not-implemented"  # a 501 from the proxy; the upstream sees nothing


@dataclass(frozen=True)
class Case:
    name: str
    template: bytes
    expect: str = REJECT

    def raw(self, decoy_port: int) -> bytes:
        return (self.template.replace(b"{key}", uuid.uuid4().hex.encode())
                .replace(b"{decoy}", str(decoy_port).encode()))


def _post(headers: bytes, body: bytes = b"", target: bytes = b"/exec/hostile",
          version: bytes = b"HTTP/1.1") -> bytes:
    return (b"POST " + target + b" " + version + b"\r\nHost: proxy.test\r\n" + AUTH +
            headers + b"\r\n" + body)


AUTH = b"Authorization: Bearer hostile\r\n"  # a credential: the tenant is not the reason
SMUGGLED = b"POST /exec/smuggled HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 0\r\n\r\n"
KEY = b"Idempotency-Key: {key}\r\n"

CASES = [
    # Content-Length and Transfer-Encoding together (RFC 9112 §6.3: reject or close).
    Case("cl-te", _post(KEY + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                        b"0\r\n\r\n" + SMUGGLED)),
    Case("te-cl", _post(KEY + b"Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
                        b"0\r\n\r\n" + SMUGGLED)),
    Case("cl-te-unguarded", _post(b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                                  b"0\r\n\r\nX" + SMUGGLED)),
    Case("duplicate-cl-differ", _post(KEY + b"Content-Length: 2\r\nContent-Length: 3\r\n",
                                      b"abc")),
    Case("duplicate-cl-same", _post(KEY + b"Content-Length: 3\r\nContent-Length: 3\r\n",
                                    b"abc")),
    Case("cl-list", _post(KEY + b"Content-Length: 3, 3\r\n", b"abc")),
    Case("cl-plus", _post(KEY + b"Content-Length: +3\r\n", b"abc")),
    Case("cl-negative", _post(KEY + b"Content-Length: -1\r\n", b"abc")),
    Case("cl-hex", _post(KEY + b"Content-Length: 0x3\r\n", b"abc")),
    Case("cl-huge", _post(KEY + b"Content-Length: 99999999999999999999999\r\n", b"abc")),
    Case("cl-space-before-colon", _post(KEY + b"Content-Length : 3\r\n", b"abc")),
    Case("te-space-before-colon",
         _post(KEY + b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n" + SMUGGLED)),
    Case("te-double", _post(KEY + b"Transfer-Encoding: chunked\r\n"
                            b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n" + SMUGGLED)),
    Case("te-not-last", _post(KEY + b"Transfer-Encoding: chunked, identity\r\n",
                              b"0\r\n\r\n" + SMUGGLED)),
    Case("te-xchunked", _post(KEY + b"Transfer-Encoding: xchunked\r\n",
                              b"0\r\n\r\n" + SMUGGLED)),
    Case("te-vertical-tab", _post(KEY + b"Transfer-Encoding:\x0bchunked\r\n",
                                  b"0\r\n\r\n" + SMUGGLED)),
    Case("chunked-http10", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                 b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED, version=b"HTTP/1.0")),
    # Bad chunk framing.
    Case("chunk-size-not-hex", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                     b"zz\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-negative", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                      b"-3\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-0x", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                b"0x3\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-size-overflow", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                      b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n")),
    Case("chunk-data-too-long", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                      b"3\r\nabcdef\r\n0\r\n\r\n" + SMUGGLED)),
    Case("chunk-missing-crlf", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                     b"3\r\nabc0\r\n\r\n" + SMUGGLED)),
    Case("chunk-size-bare-lf", _post(KEY + b"Transfer-Encoding: chunked\r\n",
                                     b"3\nabc\r\n0\r\n\r\n" + SMUGGLED)),
    # Header syntax.
    Case("obs-fold", _post(KEY + b"X-Note: one\r\n two\r\nContent-Length: 0\r\n")),
    Case("obs-fold-key", _post(b"Idempotency-Key: {key}\r\n tail\r\nContent-Length: 0\r\n")),
    Case("duplicate-key", _post(KEY + KEY.replace(b"{key}", b"other") +
                                b"Content-Length: 0\r\n")),
    Case("key-control-char", _post(b"Idempotency-Key: a\x01b\r\nContent-Length: 0\r\n")),
    Case("key-non-ascii", _post(b"Idempotency-Key: caf\xc3\xa9\r\nContent-Length: 0\r\n")),
    Case("key-too-long", _post(b"Idempotency-Key: " + b"k" * 256 +
                               b"\r\nContent-Length: 0\r\n")),
    Case("nul-in-header-value", _post(KEY + b"X-A: a\x00b\r\nContent-Length: 0\r\n")),
    Case("nul-in-header-name", _post(KEY + b"X-\x00A: b\r\nContent-Length: 0\r\n")),
    Case("nul-in-target", _post(KEY + b"Content-Length: 0\r\n", target=b"/exec/a\x00b")),
    Case("nul-in-key", _post(b"Idempotency-Key: ab\x00cd\r\nContent-Length: 0\r\n")),
    Case("bare-cr-in-header", _post(KEY + b"X-A: a\rContent-Length: 40\r\n"
                                    b"Content-Length: 0\r\n")),
    Case("bare-lf-line-ends",
         b"POST /exec/hostile HTTP/1.1\nHost: proxy.test\nIdempotency-Key: {key}\n"
         b"Content-Length: 0\n\n"),
    Case("space-in-header-name", _post(KEY + b"X Bad: 1\r\nContent-Length: 0\r\n")),
    Case("header-no-colon", _post(KEY + b"JustAName\r\nContent-Length: 0\r\n")),
    Case("huge-header", _post(KEY + b"X-Big: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n")),
    Case("huge-target", _post(KEY + b"Content-Length: 0\r\n",
                              target=b"/exec/" + b"a" * 70000)),
    Case("many-headers", _post(KEY + b"".join(b"X-H%d: v\r\n" % i for i in range(3000)) +
                               b"Content-Length: 0\r\n")),
    Case("http-version-garbage", _post(KEY + b"Content-Length: 0\r\n", version=b"HTTP/1.x")),
    # No HTTP-version (HTTP/0.9 shape) yet headers and a body: found by fuzz/ — the
    # request was forwarded and answered with an "HTTP/0.9 201 Created" status line.
    Case("no-version-with-headers", b"POST /exec/hostile\r\nHost: proxy.test\r\n"
                                    b"Idempotency-Key: {key}\r\nContent-Length: 2\r\n\r\nhi"),
    Case("no-version-bare", b"POST /exec/hostile\r\n\r\n"),
    Case("http2-preface-as-1.1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SMUGGLED),
    Case("method-garbage", b"PO(ST /exec/hostile HTTP/1.1\r\nHost: proxy.test\r\n"
                           b"Idempotency-Key: {key}\r\nContent-Length: 0\r\n\r\n"),
    Case("trailer-smuggles-key", _post(b"Transfer-Encoding: chunked\r\nTrailer: X\r\n",
                                       b"0\r\nIdempotency-Key: {key}\r\n"
                                       b"Content-Length: 40\r\n\r\n"),
         expect=UPSTREAM_ONLY),
    # Another host named in the target or in Host: never a different upstream.
    Case("absolute-form-other-host",
         b"POST http://127.0.0.1:{decoy}/exec/absolute HTTP/1.1\r\nHost: 127.0.0.1:{decoy}"
         b"\r\nIdempotency-Key: {key}\r\nContent-Length: 2\r\n\r\nhi", expect=UPSTREAM_ONLY),
    Case("absolute-form-unguarded",
         b"POST http://127.0.0.1:{decoy}/exec/absolute HTTP/1.1\r\nHost: proxy.test\r\n"
         b"Content-Length: 2\r\n\r\nhi", expect=UPSTREAM_ONLY),
    Case("absolute-form-get", b"GET http://127.0.0.1:{decoy}/exec/absolute HTTP/1.1\r\n"
                              b"Host: 127.0.0.1:{decoy}\r\n\r\n", expect=UPSTREAM_ONLY),
    Case("host-other-host", b"POST /exec/host HTTP/1.1\r\nHost: 127.0.0.1:{decoy}\r\n"
                            b"Idempotency-Key: {key}\r\nContent-Length: 2\r\n\r\nhi",
         expect=UPSTREAM_ONLY),
    # RFC 9112 §3.2: an HTTP/1.1 request without Host is a 400.
    Case("no-host-http11", AUTH.join([b"POST /exec/host HTTP/1.1\r\n", KEY +
                                      b"Content-Length: 2\r\n\r\nhi"])),
    Case("double-host", b"POST /exec/host HTTP/1.1\r\nHost: proxy.test\r\n"
                        b"Host: 127.0.0.1:{decoy}\r\nContent-Length: 2\r\n\r\nhi"),
    # Raw UTF-8 in the target: idemproxy's HTTP/1.1 client writes visible ASCII only; the
    # target reaches it percent-encoded, and the request is forwarded, never a 500.
    Case("raw-utf8-target", _post(KEY + b"Content-Length: 2\r\n", b"hi",
                                  target=b"/exec/caf\xc3\xa9"), expect=UPSTREAM_ONLY),
    # CONNECT: a reverse proxy is no forward proxy (#25): 501, nothing forwarded.
    Case("connect-method", b"CONNECT 127.0.0.1:{decoy} HTTP/1.1\r\n"
                           b"Host: 127.0.0.1:{decoy}\r\n\r\n", expect=NOT_IMPLEMENTED),
]


@dataclass
class Exchange:
    statuses: list[int]
    closed: bool
    head: bytes


async def exchange(port: int, raw: bytes, *, timeout: float = 4.0,
                   idle: float = 1.0) -> Exchange:
    """Send raw bytes and read until the proxy closes, or has gone quiet after answering.

    The write side stays open: a half-close would let the proxy drop the connection
    for that reason alone, and every case would look refused.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    closed = False
    loop = asyncio.get_running_loop()
    try:
        writer.write(raw)
        await writer.drain()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            try:
                chunk = await asyncio.wait_for(reader.read(65536),
                                               min(left, idle) if data else left)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            data += chunk
    except ConnectionError:
        closed = True
    finally:
        writer.close()
    statuses = [int(m) for m in re.findall(rb"HTTP/\d\.\d (\d{3}) ", data)]
    return Exchange(statuses, closed, data[:300])


class Decoy:
    """A listener standing for 'another host': it must never receive a single byte."""

    def __init__(self) -> None:
        self.received = b""
        self.connections = 0
        self.port = 0

    async def on_connect(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.received += await reader.read(65536)
        writer.close()


@pytest.fixture
async def decoy() -> AsyncIterator[Decoy]:
    d = Decoy()
    server = await asyncio.start_server(d.on_connect, "127.0.0.1", 0)
    d.port = server.sockets[0].getsockname()[1]
    yield d
    server.close()
    await server.wait_closed()


def _upstream_host(upstream: TestUpstream) -> str:
    return upstream.url.removeprefix("http://")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_hostile_request_is_refused_or_kept_to_the_upstream(make_proxy, upstream,
                                                                   decoy, client, case):
    """A hostile request gets a 4xx or a close and reaches no one it should not."""
    p = await make_proxy()
    port = int(p.url.rsplit(":", 1)[1])
    before = len(upstream.executions)
    got = await exchange(port, case.raw(decoy.port))
    new = upstream.executions[before:]
    assert decoy.connections == 0, f"another host was contacted: {decoy.received[:200]!r}"
    assert not [e for e in new if "smuggled" in e.path], f"smuggled through: {got.head!r}"
    assert all(e.headers.get("Host") == _upstream_host(upstream) for e in new)
    if case.expect == NOT_IMPLEMENTED:
        assert got.statuses == [501] and new == [], got.head
    elif case.expect == REJECT:
        assert got.closed or got.statuses, f"no answer and no close: {got.head!r}"
        assert all(400 <= s < 500 for s in got.statuses), got.head
        assert new == [], f"reached the upstream: {[(e.method, e.path) for e in new]}"
    else:
        assert all(s < 500 or s == 502 for s in got.statuses), got.head
        assert len(new) <= len(got.statuses) <= 1, got.head  # one request, one answer
    # The next request on a fresh connection is served as usual.
    key = uuid.uuid4().hex
    async with client.post(p.url + "/exec/after", data=b"ok",
                           headers={"Idempotency-Key": key}) as resp:
        assert resp.status == 201, await resp.text()
    assert upstream.executions[-1].path == "/exec/after"
