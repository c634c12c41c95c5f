"""WebSocket (and other upgrades) through the proxy: a byte tunnel on unguarded
requests, both directions, closed cleanly from either side, counted as pass-through;
an upgrade on a guarded route is refused with problem+json."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.conftest import serve_app

ROUTES = """
- name: orders
  match: {methods: [POST], path: "/orders/*"}
"""


class WsUpstream:
    """An echo WebSocket server that greets first and can close on request."""

    def __init__(self) -> None:
        self.url = ""
        self.closed_by_client: list[int | None] = []
        self.upgrades = 0
        self.seen_headers: list[dict[str, str]] = []

    async def ws(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        self.seen_headers.append(dict(request.headers))
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        await ws.send_str("hello")  # the server speaks first: upstream -> client
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "close-me":
                await ws.close(code=4000, message=b"server says bye")
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        self.closed_by_client.append(ws.close_code)
        return ws

    async def plain(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=426, text="no websockets here")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.plain)
        return app


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    up = WsUpstream()
    async with serve_app(up.app()) as up.url:
        yield up


async def test_websocket_echo_both_ways_and_a_clean_client_close(make_proxy, ws_upstream,
                                                                 client):
    """Text and binary frames cross in both directions; the client's close handshake
    reaches the upstream (code 1000); the request counts as pass-through."""
    p = await make_proxy(ROUTES, upstream_url=ws_upstream.url)
    async with client.ws_connect(p.url + "/ws", protocols=("chat",)) as ws:
        assert ws.protocol == "chat"
        assert (await ws.receive_str(timeout=5)) == "hello"
        await ws.send_str("ping")
        assert (await ws.receive_str(timeout=5)) == "echo:ping"
        payload = bytes(range(256)) * 300  # 76.8 KB, several TCP reads
        await ws.send_bytes(payload)
        assert (await ws.receive_bytes(timeout=5)) == payload[::-1]
        await ws.close()
        assert ws.close_code == 1000
    for _ in range(100):
        if ws_upstream.closed_by_client:
            break
        await asyncio.sleep(0.02)
    assert ws_upstream.closed_by_client == [1000]
    headers = ws_upstream.seen_headers[0]
    assert headers["Upgrade"].lower() == "websocket"
    assert headers["Host"] == ws_upstream.url.removeprefix("http://")
    assert "X-Forwarded-For" in headers
    assert p.metric("idemproxy_requests_total", route="-", outcome="pass_through") == 1


async def test_the_upstream_closing_reaches_the_client(make_proxy, ws_upstream, client):
    """The upstream's close frame (code 4000) reaches the client and the tunnel ends."""
    p = await make_proxy(ROUTES, upstream_url=ws_upstream.url)
    async with client.ws_connect(p.url + "/ws") as ws:
        assert (await ws.receive_str(timeout=5)) == "hello"
        await ws.send_str("close-me")
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 4000
        assert msg.extra == "server says bye"


async def test_two_tunnels_at_once_stay_apart(make_proxy, ws_upstream, client):
    """Concurrent tunnels each get their own upstream connection and their own echoes."""
    p = await make_proxy(ROUTES, upstream_url=ws_upstream.url)

    async def talk(word: str) -> str:
        async with client.ws_connect(p.url + "/ws") as ws:
            await ws.receive_str(timeout=5)
            await ws.send_str(word)
            return await ws.receive_str(timeout=5)

    assert await asyncio.gather(talk("a"), talk("b")) == ["echo:a", "echo:b"]
    assert ws_upstream.upgrades == 2


async def test_an_upgrade_the_upstream_declines_is_its_answer(make_proxy, ws_upstream,
                                                              client):
    """No 101 from the upstream: its answer (here 426 with a body) reaches the client."""
    p = await make_proxy(ROUTES, upstream_url=ws_upstream.url)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(p.url + "/nows")
    assert info.value.status == 426
    async with client.get(p.url + "/nows", headers={"Connection": "Upgrade",
                                                    "Upgrade": "websocket"}) as resp:
        assert resp.status == 426 and await resp.text() == "no websockets here"


async def test_an_upgrade_on_a_guarded_route_is_refused(make_proxy, ws_upstream, client):
    """A route's method with Upgrade is a 400 problem+json; nothing reaches the upstream."""
    p = await make_proxy(ROUTES, upstream_url=ws_upstream.url)
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Idempotency-Key": "k1",
               "Authorization": "Bearer t"}
    async with client.post(p.url + "/orders/1", headers=headers, data=b"{}") as resp:
        doc = json.loads(await resp.read())
        assert resp.status == 400
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert doc["type"].endswith("/upgrade-refused")
    assert ws_upstream.upgrades == 0
    assert p.metric("idemproxy_requests_total", route="orders", outcome="rejected") == 1


async def test_a_websocket_to_an_https_upstream_uses_its_tls_settings(make_proxy, client,
                                                                     tmp_path):
    """The tunnel to an https:// upstream checks its certificate against tls.ca_file
    and sends server_name as SNI."""
    from tests.tls_certs import make_private_ca

    ca = make_private_ca(tmp_path / "ca")
    up = WsUpstream()
    ctx = ca.server_context()
    sni: list[str | None] = []
    ctx.sni_callback = lambda obj, name, _ctx: sni.append(name)  # type: ignore[assignment]
    runner = web.AppRunner(up.app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        url = f"https://127.0.0.1:{runner.addresses[0][1]}"
        p = await make_proxy(ROUTES, upstream_url=url, extra=(
            f"  tls:\n    ca_file: {ca.ca_file}\n    server_name: upstream.test\n"))
        async with client.ws_connect(p.url + "/ws") as ws:
            assert (await ws.receive_str(timeout=5)) == "hello"
            await ws.send_str("x")
            assert (await ws.receive_str(timeout=5)) == "echo:x"
        assert sni == ["upstream.test"]
        q = await make_proxy(ROUTES, upstream_url=url)  # no ca_file: not trusted
        async with client.get(q.url + "/ws", headers={"Connection": "Upgrade",
                                                      "Upgrade": "websocket"}) as resp:
            assert resp.status == 502
            assert (await resp.json(content_type=None))["type"].endswith(
                "/upstream-tls-failed")
    finally:
        await runner.cleanup()


async def test_an_unrouted_upgrade_with_a_body_passes_through_as_plain_http(
        make_proxy, upstream, client):
    """Upgrade plus a body (h2c style) is not tunnelled: Upgrade is dropped, the request
    passes through with its body."""
    p = await make_proxy(ROUTES)
    async with client.post(p.url + "/echo", data=b"payload", headers={
            "Connection": "Upgrade", "Upgrade": "h2c"}) as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["body"] == "payload" and "Upgrade" not in doc["headers"]
