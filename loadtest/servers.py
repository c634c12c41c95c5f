"""The two tiny servers the harness runs as subprocesses, both aiohttp + uvloop.

`upstream`: the fast fake API. GET answers a small 200, POST a small fixed 201 (no JSON
encoding per request), and `/big` streams `?size=` bytes (default 100 MiB) in 256 KiB
chunks from one shared buffer.

`noop`: the do-nothing pass-through proxy, the Python ceiling. It does what any reverse
proxy must (drop hop-by-hop headers, stream both bodies, keep-alive to the upstream) and
nothing else: no routing, no keys, no store, no logs, no metrics.

    python -m loadtest.servers upstream --port N
    python -m loadtest.servers noop --port N --upstream http://127.0.0.1:M
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

from loadtest.configs import CREATED, OK

CHUNK = 256 * 1024
BIG_DEFAULT = 100 * 2**20
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "host",
})
_ZEROS = bytes(CHUNK)


async def _answer(request: web.Request) -> web.StreamResponse:
    if request.path == "/big":
        return await _big(request)
    if request.method == "GET":
        return web.Response(body=OK, content_type="application/json")
    await request.read()
    return web.Response(status=201, body=CREATED, content_type="application/json")


async def _big(request: web.Request) -> web.StreamResponse:
    await request.read()
    size = int(request.query.get("size", BIG_DEFAULT))
    resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    resp.content_length = size
    await resp.prepare(request)
    left = size
    while left > 0:
        n = min(left, CHUNK)
        await resp.write(_ZEROS if n == CHUNK else _ZEROS[:n])
        left -= n
    await resp.write_eof()
    return resp


def upstream_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    return app


def noop_app(upstream: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=4)
        # no cookie jar, like idemproxy: a proxy's one session must not keep cookies
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                         cookie_jar=aiohttp.DummyCookieJar(),
                                         skip_auto_headers=("User-Agent", "Accept",
                                                            "Accept-Encoding")) as session:
            app[session_key] = session
            yield

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content if request.body_exists else None
        async with app[session_key].request(
                request.method, upstream + request.rel_url.raw_path_qs, headers=headers,
                data=data, allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_chunked(CHUNK):
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description="the harness's upstream and do-nothing proxy")
    p.add_argument("kind", choices=["upstream", "noop"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", default="")
    a = p.parse_args()
    app = upstream_app() if a.kind == "upstream" else noop_app(a.upstream.rstrip("/"))
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # reuse_port: the harness may start several noop processes on one port (--workers)
    web.run_app(app, host="127.0.0.1", port=a.port, access_log=None, print=None,
                handler_cancellation=True, reuse_port=True)


if __name__ == "__main__":
    main()
