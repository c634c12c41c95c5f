"""Behind PgBouncer in transaction mode (issue #13): a real PgBouncer (Debian's package,
run as an unprivileged user) with a small server pool in front of the test database.
The store keeps no session state; a fleet of proxies on it executes each key once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from proxy.errors import StoreFailed
from proxy.store import Completion
from proxy.store.migrate import migrate
from proxy.store.postgres import PostgresStore
from proxy.store.sweeper import sweep_once
from tests.pgservers import PgBouncer, pgbouncer_for
from tests.procs import Cluster
from tests.test_flow import post
from tests.upstream import TestUpstream, body_json, pattern


@pytest.fixture
def bouncer(db: str) -> Iterator[PgBouncer]:
    """PgBouncer, transaction mode, three server connections, in front of the test db."""
    b = pgbouncer_for(db, pool_size=3)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def tiny_bouncer(db: str) -> Iterator[PgBouncer]:
    """PgBouncer with one server connection: every client shares one server session."""
    b = pgbouncer_for(db, pool_size=1)
    try:
        yield b
    finally:
        b.stop()


async def _store(url: str, *, pooler: bool, size: int = 4) -> PostgresStore:
    return await PostgresStore.connect(url, min_size=1, max_size=size, timeout=5,
                                       transaction_pooler=pooler)


async def test_session_state_never_outlives_a_transaction(tiny_bouncer: PgBouncer):
    """Another client's DEALLOCATE ALL on the shared server session breaks a store that
    prepared named statements (asyncpg's cache) but not one with pooler: transaction,
    whose every statement is one Parse/Bind/Execute exchange."""
    other = await asyncpg.connect(tiny_bouncer.url, statement_cache_size=0)
    try:
        for pooler, survives in ((False, False), (True, True)):
            store = await _store(tiny_bouncer.url, pooler=pooler, size=1)
            try:
                await store.clock_offset()
                await other.execute("DEALLOCATE ALL")
                if survives:
                    await store.clock_offset()
                else:
                    with pytest.raises(StoreFailed, match="26000"):
                        await store.clock_offset()
            finally:
                await store.close()
    finally:
        await other.close()


async def test_every_store_operation_works_through_transaction_pooling(
        bouncer: PgBouncer):
    """Migrations, claims, batched completions, releases, lease renewals, chunked bodies,
    admin reads and a sweep, 48 keys at once over 8 client connections sharing 3 server
    connections: every call answers, none sees another's statement."""
    conn = await asyncpg.connect(bouncer.url, statement_cache_size=0)
    try:
        assert await migrate(conn) == []  # current: the transaction-scoped lock, no-op
    finally:
        await conn.close()
    store = await _store(bouncer.url, pooler=True, size=8)
    scope = f"pgb:{uuid.uuid4().hex[:8]}"

    async def one(i: int) -> None:
        key, token = f"k{i}", uuid.uuid4()
        c = await store.claim(scope=scope, key=key, fingerprint=b"f", token=token,
                              lease=30, ttl=60 if i % 4 else 0.01)
        assert c.record.lock_token == token
        assert await store.extend(scope=scope, key=key, token=token, lease=30)
        if i % 3 == 0:
            assert await store.release(scope=scope, key=key, token=token, notify=True)
            return
        body = pattern(1000, i)
        await store.write_chunk(scope=scope, key=key, token=token, seq=0, data=body)
        done = Completion(201, (("X-I", str(i)),), None, 1, len(body), False)
        assert await store.complete(scope=scope, key=key, token=token, done=done,
                                    notify=i % 2 == 0)
        if i % 4 == 0:
            return  # left to expire: the sweep below deletes it
        again = await store.claim(scope=scope, key=key, fingerprint=b"f",
                                  token=uuid.uuid4(), lease=30, ttl=60)
        chunks = [c async for c in store.read_chunks(scope=scope, key=key, token=token)]
        assert (again.record.status, b"".join(chunks)) == (201, body)
        assert (await store.show(scope=scope, key=key) or {})["status"] == 201

    try:
        await asyncio.gather(*(one(i) for i in range(48)))
        await asyncio.sleep(0.05)
        assert await sweep_once(store) >= 8  # the completed keys with ttl 0.01
    finally:
        await store.close()


def _fleet_config(direct_url: str) -> str:
    return (f"database:\n  pooler: transaction\n  listen_url: {direct_url}\n"
            "  pool_max: 6\n")


ROUTES = """
- name: wait
  match: {methods: [POST], path: "/exec/w/*"}
  require_key: true
  concurrent: wait
  wait_timeout: 20s
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  require_key: true
"""


@pytest.fixture
async def fleet(bouncer: PgBouncer, db: str, tmp_path: Path,
                upstream: TestUpstream) -> AsyncIterator[Cluster]:
    """Three proxies with two workers each, all through the one PgBouncer."""
    c = Cluster(tmp_path, bouncer.url)
    try:
        await asyncio.gather(*(c.start(ROUTES, upstream=upstream.url, workers=2,
                                       extra=_fleet_config(db)) for _ in range(3)))
        yield c
    finally:
        c.stop_all()


@pytest.mark.slow
async def test_three_proxies_two_workers_each_through_pgbouncer(
        fleet: Cluster, db: str, upstream: TestUpstream, client: aiohttp.ClientSession):
    """Duplicates fired at all three proxies through PgBouncer (transaction mode, 3 server
    connections for 6 processes): no 5xx, one execution per key, replays byte for byte;
    a `concurrent: wait` retry on another proxy gets the first's answer; a key deleted
    through one proxy's admin API is dropped from every proxy's replay cache."""
    procs = fleet.procs
    keys = [uuid.uuid4().hex for _ in range(40)]
    calls = [(k, procs[j % 3]) for k in keys for j in range(6)]
    results = await asyncio.gather(*(post(client, p.url + f"/exec/{k}", key=k)
                                     for k, p in calls))
    assert not [s for s, _, _ in results if s >= 500]
    first: dict[str, bytes] = {}
    for (k, _), (s, _, body) in zip(calls, results, strict=True):
        if s == 201:
            assert first.setdefault(k, body) == body
        else:
            assert s == 409  # a duplicate that met the first still in flight
    for k in keys:
        assert upstream.count(f"/exec/{k}") == 1
        for p in procs:
            s, h, body = await post(client, p.url + f"/exec/{k}", key=k)
            assert (s, h["Idempotent-Replayed"], body) == (201, "true", first[k])

    key = uuid.uuid4().hex
    held = asyncio.create_task(post(client, procs[0].url + f"/exec/w/{key}?delay=1", key=key))
    while upstream.count(f"/exec/w/{key}") == 0:
        await asyncio.sleep(0.01)
    waited = await asyncio.gather(*(post(client, p.url + f"/exec/w/{key}?delay=1", key=key)
                                    for p in procs[1:]))
    s0, _, b0 = await held
    assert [(s, b) for s, _, b in waited] == [(201, b0)] * 2 and s0 == 201
    assert upstream.count(f"/exec/w/{key}") == 1

    k = keys[0]
    scope = await _scope_of(db, k)
    for p in procs:  # warm every worker's replay cache
        for _ in range(6):
            await post(client, p.url + f"/exec/{k}", key=k)
    async with client.delete(procs[1].admin_url + "/admin/keys",
                             params={"scope": scope, "key": k}) as r:
        assert r.status == 200
    await asyncio.sleep(0.5)  # the NOTIFY reaches every LISTEN connection in milliseconds
    new = await post(client, procs[2].url + f"/exec/{k}", key=k)
    assert new[0] == 201 and body_json(new[2])["n"] == 2
    for p in procs:
        for _ in range(6):
            s, _, body = await post(client, p.url + f"/exec/{k}", key=k)
            assert (s, body) == (201, new[2])
    assert upstream.count(f"/exec/{k}") == 2


async def _scope_of(db: str, key: str) -> str:
    conn = await asyncpg.connect(db)
    try:
        scope: str = await conn.fetchval("SELECT scope FROM idemproxy_keys WHERE key = $1",
                                         key)
        return scope
    finally:
        await conn.close()


@pytest.mark.slow
async def test_without_listen_url_waiters_poll_and_the_cache_is_off(
        bouncer: PgBouncer, tmp_path: Path, upstream: TestUpstream,
        client: aiohttp.ClientSession):
    """pooler: transaction and no listen_url: the start-up log says LISTEN is off, a
    `concurrent: wait` retry still gets the first answer (by polling), and replays come
    from the database (the replay cache is off)."""
    c = Cluster(tmp_path, bouncer.url)
    try:
        p = await c.start(ROUTES, upstream=upstream.url,
                          extra="database:\n  pooler: transaction\n")
        key = uuid.uuid4().hex
        held = asyncio.create_task(post(client, p.url + f"/exec/w/{key}?delay=0.5", key=key))
        while upstream.count(f"/exec/w/{key}") == 0:
            await asyncio.sleep(0.01)
        s, h, body = await post(client, p.url + f"/exec/w/{key}?delay=0.5", key=key)
        s0, _, b0 = await held
        assert (s, s0, body, h["Idempotent-Replayed"]) == (201, 201, b0, "true")
        for _ in range(3):
            await post(client, p.url + f"/exec/w/{key}", key=key)
        async with client.get(p.admin_url + "/metrics") as r:
            metrics = await r.text()
        hits = [line for line in metrics.splitlines()
                if line.startswith("idemproxy_replay_cache_hits_total")]
        assert all(line.endswith(" 0.0") for line in hits)
        assert "no LISTEN connection" in p.output()
    finally:
        c.stop_all()
