"""Hostile upstreams (issue #25, the upstream and framing side), over real sockets and a
real Postgres: upgrades other than WebSocket are never tunnelled, an answer with odd
bytes in its head or body framing is relayed or stored as a failure (never executed
twice), JSON numbers out of any range are a clean 400, and the answer a client sees is
the upstream's own (reason phrase, no invented Content-Type, our replay marker only).

The misbehaving upstreams are written here: `RawUpstream` writes exact bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httptools
import pytest

from tests.conftest import free_port

AUTH = "Bearer hostile-upstream"
ROUTES = """
- name: charges
  match: {methods: [POST], path: /v1/charges}
  require_key: true
- name: brief  # a lease that ends within the test: a kept claim would be retried
  match: {methods: [POST], path: "/brief/*"}
  lock_timeout: 1s
- name: stripe-hooks
  match: {methods: [POST], path: /hooks/stripe}
  preset: stripe
- name: emails
  match: {methods: [POST], path: /v1/emails}
  key: {body: [/to]}
  require_key: true
- name: canonical
  match: {methods: [POST], path: "/canonical/*"}
  fingerprint: {canonical_json: true}
- name: exec
  match: {methods: [POST, PUT, DELETE], path: "/exec/*"}
"""


def new_key() -> str:
    return uuid.uuid4().hex


# --- a raw upstream and a strict raw client -------------------------------------------

@dataclass
class Seen:
    method: str
    path: str
    head: bytes
    body: bytes


Answer = Callable[[Seen], list[bytes | float]]  # bytes to write; a float: sleep that long


@dataclass
class RawUpstream:
    """Writes exactly the bytes `answer` returns for each request it reads (keep-alive:
    it reads the next request on the same connection unless `close` says otherwise)."""

    answer: Answer
    close: bool = False
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, prefix: str = "") -> int:
        return sum(1 for s in self.seen if s.path.startswith(prefix))

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                body = await reader.readexactly(int(m.group(1))) if m else b""
                method, target = head.split(b" ", 2)[:2]
                seen = Seen(method.decode(), target.decode().split("?")[0], head, body)
                self.seen.append(seen)
                for piece in self.answer(seen):
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    writer.write(piece)
                    await writer.drain()
                if self.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., RawUpstream]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer, *, close: bool = False) -> RawUpstream:
        up = RawUpstream(answer, close=close)
        server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        up.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return up

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()


@dataclass
class Reply:
    """One response as a strict HTTP/1.1 parser (llhttp) read it off the wire."""

    status: int = 0
    reason: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    complete: bool = False  # the message ended as its own framing says
    closed: bool = False
    error: str = ""
    head_done: bool = False

    def header(self, name: str) -> bytes | None:
        values = [v for k, v in self.headers if k.lower() == name.lower().encode()]
        return values[0] if values else None


class _Collect:
    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def on_status(self, status: bytes) -> None:
        self.reply.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.reply.head_done = True

    def on_body(self, body: bytes) -> None:
        self.reply.body += body

    def on_message_complete(self) -> None:
        self.reply.complete = True


async def read_reply(reader: asyncio.StreamReader, *, method: str = "POST",
                     timeout: float = 10.0) -> Reply:
    """Read one final response, strictly framed; stops at its end, a close or timeout."""
    while True:
        reply = Reply()
        parser = httptools.HttpResponseParser(_Collect(reply))
        try:
            async with asyncio.timeout(timeout):
                while not reply.complete:
                    if method == "HEAD" and reply.head_done:  # its answer has no body
                        reply.complete = True
                        break
                    data = await reader.read(65536)
                    if not data:
                        reply.closed = True
                        with contextlib.suppress(httptools.HttpParserError):
                            parser.feed_data(b"")
                        break
                    parser.feed_data(data)
        except TimeoutError:
            reply.error = "timeout"
        except httptools.HttpParserUpgrade:
            reply.complete, reply.error = True, "upgraded"
        except httptools.HttpParserError as exc:
            reply.error = f"bad framing: {exc}"
        reply.status = parser.get_status_code() if reply.reason or reply.headers else 0
        if not 100 <= reply.status < 200:
            return reply


async def fetch(port: int, method: str, target: str, *, key: str | None = None,
                headers: dict[str, str] | None = None, body: bytes = b"{}",
                timeout: float = 10.0) -> Reply:
    """One request on a fresh connection, written exactly; its response read strictly."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        h = {"Host": "proxy.test", "Authorization": AUTH, **(headers or {})}
        if key is not None:
            h["Idempotency-Key"] = key
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in h.items()]
        if method not in ("GET", "HEAD") or body:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return await read_reply(reader, method=method, timeout=timeout)
    finally:
        writer.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def answer(status_line: bytes, *headers: bytes, body: bytes = b'{"ok":true}',
           chunked: bool = False) -> Answer:
    """A fixed answer: the status line and headers as given, the body framed by length
    (or in two chunks)."""
    def write(seen: Seen) -> list[bytes | float]:
        head = status_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
        if chunked:
            half = len(body) // 2
            return [head + b"Transfer-Encoding: chunked\r\n\r\n",
                    b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
                        half, body[:half], len(body) - half, body[half:])]
        return [head + b"Content-Length: %d\r\n\r\n" % len(body) + body]
    return write


# --- 1. only WebSocket is tunnelled ----------------------------------------------------

@dataclass
class H2cUpstream:
    """hypercorn (default config: it accepts `Upgrade: h2c`) serving an app that counts
    the charges it executes, whichever protocol carried them."""

    charges: list[str] = field(default_factory=list)
    upgrades_seen: list[str] = field(default_factory=list)
    url: str = ""

    async def app(self, scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.upgrades_seen.append(headers.get("upgrade", ""))
        while (await receive()).get("more_body"):
            pass
        status = 200
        if scope["method"] == "POST":
            self.charges.append(headers.get("idempotency-key", ""))
            status = 201
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body",
                    "body": b'{"http_version": "%s"}' % scope["http_version"].encode()})


@pytest.fixture
async def h2c_upstream() -> AsyncIterator[H2cUpstream]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    up = H2cUpstream()
    port = free_port()
    cfg = Config()
    cfg.bind = [f"127.0.0.1:{port}"]
    cfg.accesslog = cfg.errorlog = None
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        serve(up.app, cfg, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        await asyncio.sleep(0.02)
    up.url = f"http://127.0.0.1:{port}"
    try:
        yield up
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5)


async def _h2_charges_through(port: int, *, key: str, count: int) -> tuple[Reply, int]:
    """Ask the proxy for `Upgrade: h2c` on an unguarded GET; if it switches, send
    `count` HTTP/2 POSTs /v1/charges with one Idempotency-Key through the tunnel.
    Returns the answer to the upgrade and how many HTTP/2 responses came back."""
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = 0
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n"
                     b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                     b"HTTP2-Settings: " + settings + b"\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        reply = Reply(status=int(head.split(b" ", 2)[1]))
        if reply.status != 101:
            return reply, 0
        writer.write(conn.data_to_send())
        for i in range(count):
            stream = 3 + 2 * i
            conn.send_headers(stream, [
                (":method", "POST"), (":path", "/v1/charges"), (":scheme", "http"),
                (":authority", "proxy.test"), ("authorization", AUTH),
                ("idempotency-key", key), ("content-type", "application/json")])
            conn.send_data(stream, b'{"amount": 100}', end_stream=True)
        writer.write(conn.data_to_send())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while answered < count:
                    data = await reader.read(65536)
                    if not data:
                        break
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.StreamEnded) and event.stream_id > 1:
                            answered += 1
                    writer.write(conn.data_to_send())
        return reply, answered
    finally:
        writer.close()


async def test_an_h2c_upgrade_is_never_a_tunnel_for_guarded_requests(make_proxy,
                                                                     h2c_upstream):
    """`Upgrade: h2c` on an unguarded GET to an h2c-speaking upstream (hypercorn): no
    101 and no tunnel, so HTTP/2 POSTs with one key never reach the upstream unguarded;
    the GET itself is answered over HTTP/1.1 without the upgrade headers."""
    p = await make_proxy(ROUTES, upstream_url=h2c_upstream.url)
    reply, answered = await _h2_charges_through(port_of(p.url), key=new_key(), count=3)
    assert h2c_upstream.charges == [], f"{len(h2c_upstream.charges)} executions unguarded"
    assert reply.status == 200 and answered == 0
    assert h2c_upstream.upgrades_seen == [""]  # the GET went up without Upgrade


@pytest.mark.parametrize("upgrade", ["h2c", "websocket, h2c", "TLS/1.2", "made-up"])
async def test_an_upgrade_other_than_websocket_is_forwarded_without_it(
        make_proxy, raw_upstream, upgrade):
    """Any Upgrade other than WebSocket alone reaches the upstream as a plain request,
    without Upgrade, Connection or the fields Connection names; a 101 the upstream
    sends anyway is a 502 problem, never a tunnel."""
    up = await raw_upstream(answer(b"HTTP/1.1 101 Switching Protocols",
                                   b"Connection: Upgrade", b"Upgrade: h2c", body=b""),
                            close=True)
    p = await make_proxy(ROUTES, upstream_url=up.url)
    got = await fetch(port_of(p.url), "GET", "/anything", body=b"", headers={
        "Connection": "Upgrade, HTTP2-Settings", "Upgrade": upgrade,
        "HTTP2-Settings": base64.urlsafe_b64encode(b"\x00" * 6).decode()})
    assert got.status == 502 and got.header("Content-Type") == b"application/problem+json"
    assert got.complete and up.count("/anything") == 1
    head = up.seen[0].head.lower()
    assert b"upgrade" not in head and b"http2-settings" not in head


async def test_a_websocket_upgrade_answered_with_another_protocol_is_no_tunnel(
        make_proxy, raw_upstream):
    """A WebSocket upgrade the upstream answers with `101` for another protocol (h2c):
    refused with a 502 problem, nothing piped."""
    up = await raw_upstream(answer(b"HTTP/1.1 101 Switching Protocols",
                                   b"Connection: Upgrade", b"Upgrade: h2c", body=b""),
                            close=True)
    p = await make_proxy(ROUTES, upstream_url=up.url)
    got = await fetch(port_of(p.url), "GET", "/ws", body=b"", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"0123456789abcdef").decode()})
    assert got.status == 502 and got.header("Content-Type") == b"application/problem+json"


# --- 2. a control byte in the reason phrase --------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["small", "streamed"])
async def test_a_control_byte_in_the_reason_phrase_is_relayed_once_and_framed(
        make_proxy, raw_upstream, chunked):
    """`201 Cr\\x01ated`: the first client gets the 201 and its body, strictly framed, on
    a small and on a streamed answer; the retry is its replay; one execution."""
    up = await raw_upstream(answer(b"HTTP/1.1 201 Cr\x01ated",
                                   b"Content-Type: application/json", chunked=chunked))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/v1/charges", key=key)
    retry = await fetch(port_of(p.url), "POST", "/v1/charges", key=key)
    assert (first.status, first.complete, first.error) == (201, True, ""), first
    assert first.body == b'{"ok":true}' and b"\x01" not in first.reason
    assert (retry.status, retry.body) == (201, b'{"ok":true}')
    assert retry.header("Idempotent-Replayed") == b"true"
    assert up.count("/v1/charges") == 1


async def test_a_control_byte_in_the_reason_phrase_of_an_unguarded_answer(
        make_proxy, raw_upstream):
    """Unguarded (a GET, aiohttp's client for HEAD too): the answer is relayed, framed."""
    body = answer(b"HTTP/1.1 200 O\x7fK", body=b"x" * 300_000)
    up = await raw_upstream(lambda seen: body(seen) if seen.method == "GET" else [
        b"HTTP/1.1 200 O\x7fK\r\nContent-Length: 300000\r\n\r\n"])
    p = await make_proxy(ROUTES, upstream_url=up.url)
    for method in ("GET", "HEAD"):
        got = await fetch(port_of(p.url), method, "/page", body=b"")
        assert (got.status, got.complete, got.error) == (200, True, ""), (method, got)
        assert got.body == (b"x" * 300_000 if method == "GET" else b"")


# --- the answer as the upstream sent it: reason phrase, no invented Content-Type -------

@pytest.mark.parametrize("chunked", [False, True], ids=["small", "streamed"])
async def test_the_reason_phrase_is_stored_and_no_content_type_is_invented(
        make_proxy, raw_upstream, chunked):
    """An answer with its own reason phrase (a Latin-1 byte in it) and no Content-Type:
    the first client and the replay both get that reason, byte for byte, and no
    Content-Type (aiohttp would add octet-stream)."""
    up = await raw_upstream(answer(b"HTTP/1.1 202 Queued F\xf6r Later", body=b"raw bytes",
                                   chunked=chunked))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/exec/typed", key=key)
    retry = await fetch(port_of(p.url), "POST", "/exec/typed", key=key)
    for got in (first, retry):
        assert (got.status, got.reason, got.body) == (202, b"Queued F\xf6r Later",
                                                      b"raw bytes")
        assert got.header("Content-Type") is None, got.headers
    assert retry.header("Idempotent-Replayed") == b"true" and up.count("/exec") == 1
    plain = await fetch(port_of(p.url), "GET", "/exec/typed", body=b"")
    assert plain.reason == b"Queued F\xf6r Later" and plain.header("Content-Type") is None


# --- 3. a broken body after a valid head: answered, stored, never run again ------------

HEAD_201 = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
BROKEN = {
    # a chunk size that is no hex number, after a first good chunk (our client)
    "bad-chunk": ([HEAD_201 + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
                   0.05, b"zz\r\noops\r\n0\r\n\r\n"], False),
    # a small answer of known length cut short
    "short-small": ([HEAD_201 + b"Content-Length: 100\r\n\r\n" + b"x" * 10], True),
    # a large one cut short mid-stream
    "short-streamed": ([HEAD_201 + b"Content-Length: 900000\r\n\r\n" + b"x" * 400_000],
                       True),
    # gzip, chunked whose gzip stream is garbage
    "bad-gzip": ([HEAD_201 + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
                  b"5\r\nhello\r\n0\r\n\r\n"], False),
    # a transfer coding the proxy cannot undo
    "unknown-coding": ([HEAD_201 + b"Transfer-Encoding: compress, chunked\r\n\r\n"
                        b"5\r\nhello\r\n0\r\n\r\n"], False),
}


@pytest.mark.parametrize("case", list(BROKEN))
async def test_an_answer_broken_after_its_head_is_stored_and_never_run_again(
        make_proxy, raw_upstream, case):
    """The head arrived, so the upstream acted: whatever breaks after it, the key's
    verdict is a stored failure (502/504 problem), replayed after the lease has ended,
    never a second execution."""
    pieces, close = BROKEN[case]
    up = await raw_upstream(lambda seen: list(pieces), close=close)
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/brief/pay", key=key)
    assert not first.complete or first.status >= 500, first
    await asyncio.sleep(1.5)  # past the 1s lease: a claim merely kept would be retried
    retry = await fetch(port_of(p.url), "POST", "/brief/pay", key=key)
    assert retry.status in (502, 504) and retry.complete, retry
    assert retry.header("Content-Type") == b"application/problem+json"
    assert retry.header("Idempotent-Replayed") == b"true"
    assert up.count("/brief") == 1


def _gzip(data: bytes) -> bytes:
    import gzip
    return gzip.compress(data)


PAYLOAD = b'{"id": "ch_1", "note": "' + b"z" * 5000 + b'"}'
CODED = {
    "gzip-to-eof": ([b"HTTP/1.1 201 Created\r\nTransfer-Encoding: gzip\r\n\r\n" +
                     _gzip(PAYLOAD)], True),
    "gzip-chunked": ([b"HTTP/1.1 201 Created\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                      b"%x\r\n%s\r\n0\r\n\r\n" % (len(_gzip(PAYLOAD)), _gzip(PAYLOAD))],
                     False),
}


@pytest.mark.parametrize("case", list(CODED))
async def test_a_transfer_coded_answer_is_decoded_relayed_and_stored_once(
        make_proxy, raw_upstream, case):
    """`Transfer-Encoding: gzip` read to EOF, or `gzip, chunked`: a whole answer, not a
    truncated one: the client gets the decoded body (Transfer-Encoding is hop-by-hop),
    and so does the replay; one execution."""
    pieces, close = CODED[case]
    up = await raw_upstream(lambda seen: list(pieces), close=close)
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/brief/coded", key=key)
    await asyncio.sleep(1.2)
    retry = await fetch(port_of(p.url), "POST", "/brief/coded", key=key)
    for got in (first, retry):
        assert (got.status, got.complete, got.body) == (201, True, PAYLOAD), got.error
    assert retry.header("Idempotent-Replayed") == b"true" and up.count("/brief") == 1
    plain = await fetch(port_of(p.url), "GET", "/brief/coded", body=b"")
    assert (plain.status, plain.body) == (201, PAYLOAD)


# --- 4. JSON numbers past any range ----------------------------------------------------

HUGE = b"1e99999999999999999999"


@pytest.mark.parametrize(("path", "body"), [
    ("/hooks/stripe", b'{"id": "evt_1", "amount": ' + HUGE + b"}"),
    ("/v1/emails", b'{"to": ' + HUGE + b', "template": "t"}'),
    ("/v1/emails", b'{"to": "a@b.c", "n": -' + HUGE + b"}"),
])
async def test_a_json_number_out_of_range_in_a_body_key_is_a_400(make_proxy, raw_upstream,
                                                                 path, body):
    """A number past Decimal's range where the key is read from the body (the stripe
    preset needs no credential): a 400 problem+json naming the body, nothing forwarded."""
    up = await raw_upstream(answer(b"HTTP/1.1 201 Created"))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    got = await fetch(port_of(p.url), "POST", path, body=body,
                      headers={"Content-Type": "application/json"})
    assert got.status == 400 and got.header("Content-Type") == b"application/problem+json"
    assert b"out of range" in got.body and up.count() == 0


async def test_a_json_number_out_of_range_is_fingerprinted_verbatim(make_proxy,
                                                                    raw_upstream):
    """On a canonical_json route the body is fingerprinted as its raw bytes: the request
    runs once, its retry is a replay, a different body with the same key is a 422."""
    up = await raw_upstream(answer(b"HTTP/1.1 201 Created"))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key, body = new_key(), b'{"amount": ' + HUGE + b"}"
    h = {"Content-Type": "application/json"}
    first = await fetch(port_of(p.url), "POST", "/canonical/x", key=key, body=body, headers=h)
    retry = await fetch(port_of(p.url), "POST", "/canonical/x", key=key, body=body, headers=h)
    other = await fetch(port_of(p.url), "POST", "/canonical/x", key=key,
                        body=body.replace(b"1e", b"2e"), headers=h)
    assert (first.status, retry.status, other.status) == (201, 201, 422)
    assert retry.header("Idempotent-Replayed") == b"true" and up.count() == 1


def test_aiohttp_private_members_responses_rely_on_exist():
    """proxy/http/responses.py's list of aiohttp private members is complete (every
    `self._name` _AsSent uses) and each exists in the installed aiohttp."""
    import ast
    import inspect

    from aiohttp import web
    from aiohttp.http_writer import StreamWriter

    from proxy.http import responses

    tree = ast.parse(inspect.getsource(responses._AsSent))
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == "self"
            and n.attr.startswith("_") and not n.attr.startswith("__")}
    declared = responses.AIOHTTP_PRIVATES
    assert used <= declared["StreamResponse"], sorted(used - declared["StreamResponse"])
    resp = web.StreamResponse()
    for name in declared["StreamResponse"]:
        assert hasattr(resp, name), f"aiohttp StreamResponse has no {name}"
    writer = StreamWriter(protocol=None, loop=None)  # type: ignore[arg-type]
    for name in declared["StreamWriter"]:
        assert hasattr(writer, name), f"aiohttp StreamWriter has no {name}"


async def test_aiohttp_private_members_the_upstream_pool_relies_on_exist():
    """proxy/upstream/aiohttp_pool.py's aiohttp private members exist, and its connector builds
    connections whose reuse check it owns."""
    from proxy.upstream import aiohttp_pool as upstream_conns

    conn = upstream_conns.connector(limit=1)
    try:
        for name in upstream_conns.AIOHTTP_PRIVATES["TCPConnector"]:
            assert hasattr(conn, name), f"aiohttp TCPConnector has no {name}"
        assert isinstance(conn._factory(), upstream_conns._Handler)
    finally:
        await conn.close()


# --- the rest: empty answers, header bytes, our marker, CONNECT, stray responses -------

@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
async def test_an_empty_answer_is_stored_before_the_client_has_it(make_proxy,
                                                                  raw_upstream, status):
    """A 204 or 304 without Content-Length: the key is completed before the client has
    the whole answer, so a retry sent the moment it arrives is a replay, never a 409."""
    up = await raw_upstream(lambda seen: [b"HTTP/1.1 " + status + b"\r\nX-Done: 1\r\n\r\n"])
    p = await make_proxy(ROUTES, upstream_url=up.url)
    for _ in range(10):
        key = new_key()
        first = await fetch(port_of(p.url), "POST", "/exec/empty", key=key)
        retry = await fetch(port_of(p.url), "POST", "/exec/empty", key=key)
        assert first.status == retry.status == int(status[:3]), (first, retry)
        assert retry.header("Idempotent-Replayed") == b"true"
    assert up.count("/exec/empty") == 10


@pytest.mark.parametrize("chunked", [False, True], ids=["small", "streamed"])
async def test_header_bytes_are_relayed_and_replayed_as_received(make_proxy, raw_upstream,
                                                                 chunked):
    """Latin-1 and UTF-8 bytes in an upstream header reach the client as sent (aiohttp's
    writer dropped the non-UTF-8 ones: caf\\xe9.pdf went out as caf.pdf), and the replay
    carries the same bytes."""
    latin1 = b'Content-Disposition: attachment; filename="caf\xe9.pdf"'
    utf8 = b"X-Name: caf\xc3\xa9 \xe2\x82\xac"
    up = await raw_upstream(answer(b"HTTP/1.1 201 Created", latin1, utf8, chunked=chunked))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/exec/file", key=key)
    retry = await fetch(port_of(p.url), "POST", "/exec/file", key=key)
    plain = await fetch(port_of(p.url), "GET", "/exec/file", body=b"")
    for got in (first, retry, plain):
        assert got.status == 201 and got.complete, got
        assert got.header("Content-Disposition") == b'attachment; filename="caf\xe9.pdf"'
        assert got.header("X-Name") == b"caf\xc3\xa9 \xe2\x82\xac"
    assert retry.header("Idempotent-Replayed") == b"true" and up.count("/exec") == 2


async def test_the_replay_marker_is_always_ours(make_proxy, raw_upstream):
    """An upstream that sends `Idempotent-Replayed: true` (or `Idempotency-Body`) itself:
    the first answer carries neither, so a client never takes a first execution for a
    replay; the replay carries ours."""
    up = await raw_upstream(answer(b"HTTP/1.1 201 Created", b"Idempotent-Replayed: true",
                                   b"Idempotency-Body: omitted"))
    p = await make_proxy(ROUTES, upstream_url=up.url)
    key = new_key()
    first = await fetch(port_of(p.url), "POST", "/exec/mark", key=key)
    retry = await fetch(port_of(p.url), "POST", "/exec/mark", key=key)
    assert first.status == 201 and first.header("Idempotent-Replayed") is None
    assert first.header("Idempotency-Body") is None
    assert [v for k, v in retry.headers if k.lower() == b"idempotent-replayed"] == [b"true"]
    assert retry.header("Idempotency-Body") is None and up.count("/exec") == 1


async def test_connect_is_refused_and_never_forwarded(make_proxy, raw_upstream):
    """CONNECT: the proxy is no forward proxy: a 501 problem+json at once (a 2xx from an
    upstream held the client for 45 s), the connection closed, nothing forwarded."""
    up = await raw_upstream(lambda seen: [b"HTTP/1.1 200 Connection established\r\n\r\n"])
    p = await make_proxy(ROUTES, upstream_url=up.url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    try:
        writer.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        got = await read_reply(reader, timeout=5)
    finally:
        writer.close()
    assert got.status == 501 and got.complete, got
    assert got.header("Content-Type") == b"application/problem+json"
    assert up.count() == 0


def _twice(seen: Seen) -> list[bytes | float]:
    """A buggy upstream: two answers for one request, the second a moment later."""
    def one(who: bytes) -> bytes:
        body = b"" if seen.method == "HEAD" else b'{"for":"%s"}' % who
        return (b"HTTP/1.1 201 Created\r\nX-For: %s\r\nContent-Length: %d\r\n\r\n%s"
                % (who, len(body) or 12, body))
    return [one(seen.path.encode()), 0.05, one(b"stray")]


@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH"])
async def test_a_stray_answer_never_becomes_the_next_requests(make_proxy, raw_upstream,
                                                              method):
    """An upstream that writes a second answer after the first on a kept-alive
    connection: the next request never gets it as its answer, on our client (guarded
    POSTs of two tenants) or aiohttp's (HEAD; PATCH with a streamed body)."""
    up = await raw_upstream(_twice)
    p = await make_proxy(ROUTES, upstream_url=up.url)
    body = {"HEAD": b"", "POST": b"{}", "PATCH": b"p" * 100_000}[method]  # PATCH:
    for i, tenant in enumerate(["Bearer one", "Bearer two"] * 3):  # unguarded, streamed
        got = await fetch(port_of(p.url), method, f"/exec/{i}", key=new_key(), body=body,
                          headers={"Authorization": tenant})
        assert got.status == 201 and got.header("X-For") == b"/exec/%d" % i, got
        await asyncio.sleep(0.1)  # the stray answer has arrived on the idle connection


class _ThreadedUpstream:
    """A blocking server in a thread of its own, so that it writes while the test's event
    loop is busy (a stall the test makes with time.sleep): each request is answered with
    its path in X-For; on /a it writes a stray second answer 20 ms later."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: object) -> None:
        import socket
        import time
        assert isinstance(conn, socket.socket)
        buf = b""
        with conn, contextlib.suppress(OSError):  # the client resets a retired connection
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                while m and len(buf) < int(m.group(1)):
                    buf += conn.recv(65536)
                buf = buf[int(m.group(1)):] if m else buf
                path = head.split(b" ")[1]
                conn.sendall(b"HTTP/1.1 200 OK\r\nX-For: %s\r\nContent-Length: 2\r\n\r\nok"
                             % path)
                if path == b"/a":
                    time.sleep(0.02)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-For: stray\r\n"
                                 b"Content-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


async def test_our_client_never_lends_a_connection_with_unread_bytes():
    """A stray answer that reached the socket while the loop was busy (not yet read by
    it) retires the connection before the next request is written: that request gets
    its own answer on a new connection, never the stray one."""
    import time

    from proxy.upstream.client import UpstreamPool

    up = _ThreadedUpstream()
    pool = UpstreamPool("127.0.0.1", up.port, max_connections=4, connect_timeout=5,
                        read_timeout=5)
    try:
        first = await pool.request("POST", "/a", [("Host", "up")], b"")
        assert (first.headers["X-For"], await first.read()) == ("/a", b"ok")
        time.sleep(0.2)  # noqa: ASYNC251 - a busy loop: the stray answer lands unread
        second = await pool.request("POST", "/b", [("Host", "up")], b"")
        assert second.headers["X-For"] == "/b" and await second.read() == b"ok"
        assert up.connections == 2
    finally:
        await pool.close()
        up.close()
