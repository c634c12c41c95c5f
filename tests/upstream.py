"""A test upstream that records every execution and can misbehave on purpose.

Paths: /exec/* (count and answer; ?status=, ?delay=), /gate/* (hold until released),
/big?size=N (stream N bytes), /reset/* (execute, then drop the connection unanswered),
/stall/* (execute, then never answer), /headers (multi-value and Set-Cookie headers),
/echo (echo request headers and body), /cors/* (a CORS answer; ?expose=),
/flaky/* (503 the first time per path, then 201), anything else: 200 JSON.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web

_CYCLE = bytes((i * 7 + 3) % 256 for i in range(256))


def pattern(size: int, offset: int = 0) -> bytes:
    """Deterministic bytes (all 256 values) for byte-exact body checks: byte i is
    (i * 7 + 3) % 256, cut from a repeated 256-byte cycle (fast for 100 MiB)."""
    start = offset % 256
    return (_CYCLE * ((start + size) // 256 + 1))[start:start + size]


@dataclass
class Execution:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class TestUpstream:
    __test__ = False  # a fixture helper, not a test class

    executions: list[Execution] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def count(self, path_prefix: str = "") -> int:
        return sum(1 for e in self.executions if e.path.startswith(path_prefix))

    async def _record(self, request: web.Request) -> Execution:
        body = await request.read()
        e = Execution(request.method, request.path, request.query_string,
                      dict(request.headers), body)
        self.executions.append(e)
        return e

    async def exec_(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        n = self.count(request.path)
        delay = float(request.query.get("delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        status = int(request.query.get("status", "201"))
        return web.json_response({"n": n, "path": request.path}, status=status)

    async def gate_(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        n = self.count(request.path)  # which execution this is, fixed on arrival
        await self.gate.wait()
        return web.json_response({"n": n}, status=201)

    async def big(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        size = int(request.query["size"])
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/octet-stream"
        if request.query.get("length") == "1":
            resp.content_length = size
        await resp.prepare(request)
        step = 64 * 1024
        for off in range(0, size, step):
            await resp.write(pattern(min(step, size - off), off))
            if request.query.get("slow"):
                await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def reset(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(0.1)
        raise asyncio.CancelledError

    async def stall(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def headers(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.Response(status=200, body=b"h", headers={"Server": "upstream/1"})
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        resp.headers.add("Set-Cookie", "session=secret; HttpOnly")
        resp.headers.add("Cache-Control", "no-store")
        return resp

    async def cors(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        resp = web.json_response({"n": self.count(request.path)}, status=201)
        resp.headers["Access-Control-Allow-Origin"] = "https://app.example"
        if "expose" in request.query:
            resp.headers["Access-Control-Expose-Headers"] = request.query["expose"]
        return resp

    async def flaky(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        n = self.count(request.path)
        return web.json_response({"n": n}, status=503 if n == 1 else 201)

    async def echo(self, request: web.Request) -> web.StreamResponse:
        e = await self._record(request)
        return web.json_response({"method": e.method, "path": e.path, "query": e.query,
                                  "headers": e.headers, "body": e.body.decode("latin-1")})

    async def other(self, request: web.Request) -> web.StreamResponse:
        await self._record(request)
        return web.json_response({"ok": True, "path": request.path})

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_route("*", "/exec/{tail:.*}", self.exec_)
        r.add_route("*", "/gate/{tail:.*}", self.gate_)
        r.add_route("*", "/big", self.big)
        r.add_route("*", "/reset/{tail:.*}", self.reset)
        r.add_route("*", "/stall/{tail:.*}", self.stall)
        r.add_route("*", "/headers", self.headers)
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_route("*", "/cors/{tail:.*}", self.cors)
        r.add_route("*", "/flaky/{tail:.*}", self.flaky)
        r.add_route("*", "/{tail:.*}", self.other)
        return app


def body_json(raw: bytes) -> dict[str, object]:
    doc: dict[str, object] = json.loads(raw)
    return doc
