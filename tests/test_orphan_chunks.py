"""A database outage in the middle of recording a large answer (issue 25): the chunks
written before it belong to no answer, and once the database is back they are deleted,
not left until the key expires. A real proxy process on a PostgreSQL the test stops."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.conftest import CLIENT_AUTH, serve_app
from tests.procs import Cluster

pytestmark = pytest.mark.slow

PIECE = 64 * 1024
BEFORE, AFTER = 2 * 2**20, 2**20  # bytes sent before and after the outage


class Streamer:
    """An upstream that sends BEFORE bytes, waits for `go`, then sends AFTER more."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.executions = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.executions += 1
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        for _ in range(BEFORE // PIECE):
            await resp.write(b"a" * PIECE)
        await self.go.wait()
        for _ in range(AFTER // PIECE):
            await resp.write(b"b" * PIECE)
        await resp.write_eof()
        return resp


@pytest.fixture
async def streamer() -> AsyncIterator[tuple[Streamer, str]]:
    s = Streamer()
    app = web.Application()
    app.router.add_post("/{tail:.*}", s.handle)
    async with serve_app(app) as url:
        yield s, url
        s.go.set()


async def _chunks(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM idemproxy_chunks")
        return n
    finally:
        await conn.close()


async def _until(cond: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await cond():
            return True
        await asyncio.sleep(0.2)
    return False


async def test_chunks_of_a_recording_cut_by_an_outage_go_once_the_store_is_back(
        tmp_path: Path, own_pg, streamer):
    """Postgres stops after 2 MiB of a 3 MiB answer were recorded: the client still gets
    the whole answer, the key is stored as omitted once Postgres is back, and the proxy
    deletes the chunks then (the sweeper is an hour away, so it is not what removes them)."""
    up, up_url = streamer
    cluster = Cluster(tmp_path, own_pg.url)
    try:
        p = await cluster.start("""
- name: rec
  match: {methods: [POST], path: "/rec/*"}
  require_key: true
""", upstream=up_url, extra="database:\n  timeout: 2s\nsweep_interval: 1h\n")
        key = uuid.uuid4().hex
        headers = {**CLIENT_AUTH, "Idempotency-Key": key}
        async with aiohttp.ClientSession() as client:
            async def call() -> tuple[int, bytes]:
                async with client.post(p.url + "/rec/x", data=b"{}", headers=headers) as r:
                    return r.status, await r.read()
            first = asyncio.create_task(call())
            assert await _until(lambda: _chunk_count_at_least(own_pg.url, 7), 30), \
                p.output()
            await asyncio.to_thread(own_pg.stop)
            up.go.set()
            status, body = await asyncio.wait_for(first, 30)
            assert status == 200 and len(body) == BEFORE + AFTER
            await asyncio.to_thread(own_pg.start)
            assert await _until(lambda: _no_chunks(own_pg.url), 30), p.output()
            for _ in range(100):  # the completion lands after its own retry
                async with client.post(p.url + "/rec/x", data=b"{}", headers=headers) as r:
                    if r.status == 200:
                        assert r.headers["Idempotent-Replayed"] == "true"
                        assert r.headers["Idempotency-Body"] == "omitted"
                        break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError(f"no replay after the outage: {p.output()}")
        assert up.executions == 1
        assert await _chunks(own_pg.url) == 0
    finally:
        cluster.stop_all()


async def _chunk_count_at_least(url: str, n: int) -> bool:
    return await _chunks(url) >= n


async def _no_chunks(url: str) -> bool:
    try:
        return await _chunks(url) == 0
    except (OSError, asyncpg.PostgresError):
        return False
