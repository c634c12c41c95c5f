"""`database.sharding: citus` (issue #29) on a real cluster the session starts (a
coordinator and two workers, tests/citus.py): several proxy processes on the coordinator,
duplicates fired at all of them, rows spread over both workers, NOTIFY where the
listeners are, and a worker killed under load."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from proxy.errors import RuntimeFailure
from proxy.store import ClaimOutcome, Completion, notify_channel_id
from proxy.store.migrate import migrate
from proxy.store.notify import CHANNEL
from proxy.store.postgres import PostgresStore
from tests.conftest import CLIENT_AUTH, serve_app
from tests.procs import Cluster, ProxyProcess
from tests.test_flow import post
from tests.upstream import TestUpstream

pytestmark = pytest.mark.slow

ROUTES = """
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  require_key: true
  concurrent: wait
  wait_timeout: 20s
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  require_key: true
"""
CITUS = "database:\n  sharding: citus\n  timeout: 4s\n"


@pytest.fixture(scope="module")
async def module_upstream() -> AsyncIterator[TestUpstream]:
    up = TestUpstream()
    async with serve_app(up.app()) as up.url:
        yield up
        up.gate.set()


@pytest.fixture(scope="module")
async def proxies(citus_db: str, module_upstream: TestUpstream,
                  tmp_path_factory: pytest.TempPathFactory
                  ) -> AsyncIterator[list[ProxyProcess]]:
    """Three proxy processes on the coordinator, `database.sharding: citus`."""
    cluster = Cluster(tmp_path_factory.mktemp("citus-proxies"), citus_db)
    try:
        for _ in range(3):
            await cluster.start(ROUTES, upstream=module_upstream.url, extra=CITUS)
        yield cluster.procs
    finally:
        cluster.stop_all()


async def worker_of(coordinator: str, keys: list[str]) -> dict[str, int]:
    """Each key's worker (its port), from the coordinator's shard placements."""
    conn = await asyncpg.connect(coordinator)
    try:
        rows = await conn.fetch("""
            SELECT k AS key, s.nodeport FROM unnest($1::text[]) AS k
              JOIN citus_shards s ON s.shardid =
                   get_shard_id_for_distribution_column('idemproxy_keys', k)
             WHERE s.table_name = 'idemproxy_keys'::regclass""", keys)
    finally:
        await conn.close()
    return {r["key"]: r["nodeport"] for r in rows}


async def rows_on_worker(cluster: Any, name: str, keys: list[str]) -> int:
    """How many of `keys` have a record in the shards stored on that worker itself."""
    conn = await asyncpg.connect(cluster.node_url(name))
    try:
        await conn.execute("SET citus.override_table_visibility TO off")  # see shards
        shards = await conn.fetch("SELECT relname FROM pg_class WHERE relkind = 'r' "
                                  "AND relname ~ '^idemproxy_keys_[0-9]+$'")
        total = 0
        for s in shards:
            total += await conn.fetchval(
                f'SELECT count(*) FROM "{s["relname"]}" WHERE key = ANY($1)', keys)
        return total
    finally:
        await conn.close()


async def test_duplicates_on_three_proxies_execute_once_rows_on_both_workers(
        proxies: list[ProxyProcess], module_upstream: TestUpstream, citus_cluster: Any):
    """Duplicates fired at three proxies on a Citus cluster: one execution per key, every
    answer and every later replay byte for byte the same, records on both workers."""
    keys = [uuid.uuid4().hex for _ in range(16)]
    async with aiohttp.ClientSession(headers=CLIENT_AUTH) as client:
        results = await asyncio.gather(*[
            post(client, proxies[i % 3].url + f"/exec/{k}?delay=0.2", key=k)
            for k in keys for i in range(6)])
        replays = await asyncio.gather(*[
            post(client, p.url + f"/exec/{k}?delay=0.2", key=k)
            for k in keys for p in proxies])
    for k in keys:
        assert module_upstream.count(f"/exec/{k}") == 1
    by_key: dict[str, set[bytes]] = {}
    for (status, _, body), k in zip(results, [k for k in keys for _ in range(6)],
                                    strict=True):
        assert status == 201
        by_key.setdefault(k, set()).add(body)
    for (status, headers, body), k in zip(replays, [k for k in keys for _ in proxies],
                                          strict=True):
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        by_key[k].add(body)
    assert all(len(bodies) == 1 for bodies in by_key.values())
    on = [await rows_on_worker(citus_cluster, w, keys) for w in ("worker1", "worker2")]
    assert sum(on) == len(keys) and min(on) > 0


async def test_wait_on_another_proxy_gets_the_first_ones_answer(
        proxies: list[ProxyProcess], module_upstream: TestUpstream):
    """`concurrent: wait` across proxies on Citus: a duplicate held on proxy B gets the
    answer proxy A stored, marked replayed, and the upstream ran once."""
    key = uuid.uuid4().hex
    async with aiohttp.ClientSession(headers=CLIENT_AUTH) as client:
        first = asyncio.create_task(post(client, proxies[0].url + f"/exec/{key}?delay=1",
                                         key=key))
        while module_upstream.count(f"/exec/{key}") == 0:
            await asyncio.sleep(0.01)
        status, headers, body = await post(client, proxies[1].url + f"/exec/{key}?delay=1",
                                           key=key)
        status1, _, body1 = await first
    assert (status, status1) == (201, 201) and body == body1
    assert headers["Idempotent-Replayed"] == "true"
    assert module_upstream.count(f"/exec/{key}") == 1


async def test_keys_delete_reaches_every_proxys_replay_cache(
        proxies: list[ProxyProcess], module_upstream: TestUpstream, citus_db: str):
    """A key deleted through one proxy's admin API is dropped from every proxy's replay
    cache (NOTIFY on the coordinator): its next request executes again and every proxy
    then replays the new answer, never the deleted one."""
    key = uuid.uuid4().hex
    path = f"/exec/{key}"
    async with aiohttp.ClientSession(headers=CLIENT_AUTH) as client:
        _, _, original = await post(client, proxies[0].url + path, key=key)
        for p in proxies:  # every proxy replays it (and keeps it in its cache)
            for _ in range(2):
                assert (await post(client, p.url + path, key=key))[2] == original
        conn = await asyncpg.connect(citus_db)
        try:
            scope = await conn.fetchval("SELECT scope FROM idemproxy_keys WHERE key = $1",
                                        key)
        finally:
            await conn.close()
        async with client.delete(proxies[0].admin_url + "/admin/keys",
                                 params={"scope": scope, "key": key}) as r:
            assert r.status == 200, await r.text()
        async with asyncio.timeout(10):
            while True:  # replays from proxy 1's cache until the NOTIFY lands
                status, headers, fresh = await post(client, proxies[1].url + path, key=key)
                if "Idempotent-Replayed" not in headers:
                    break
                await asyncio.sleep(0.01)
        assert status == 201 and fresh != original
        for p in proxies:  # each has heard the deletion: the new answer, never the old
            async with asyncio.timeout(10):
                while (body := (await post(client, p.url + path, key=key))[2]) != fresh:
                    assert body == original
                    await asyncio.sleep(0.01)
    assert module_upstream.count(path) == 2


async def test_migrate_converts_a_single_node_database_with_records():
    """`idemproxy migrate` with `sharding: citus` converts a database that holds records
    (its tables local to the coordinator): the records are copied into the workers'
    shards and still replay; a second run changes nothing."""
    from tests.citus import CitusCluster

    cluster = await asyncio.to_thread(CitusCluster)
    try:
        conn = await asyncpg.connect(cluster.url)
        try:
            await migrate(conn)  # the single-node layout, as before the switch
            assert not await conn.fetchval(
                "SELECT count(*) FROM pg_dist_partition")
        finally:
            await conn.close()
        single = await PostgresStore.connect(cluster.url, min_size=1, max_size=4)
        await single.load_sealer(keys=())
        keys = [uuid.uuid4().hex for _ in range(12)]
        for k in keys:
            token = uuid.uuid4()
            await single.claim(scope="r:t", key=k, fingerprint=b"f", token=token, lease=30,
                               ttl=600)
            assert await single.complete(scope="r:t", key=k, token=token, notify=False,
                                         done=Completion(201, (), k.encode(), 0, 32, False))
        await single.close()
        sharded = await PostgresStore.connect(cluster.url, min_size=1, max_size=4,
                                              citus=True)
        try:
            applied = await sharded.migrate()
            assert "distributed idemproxy_keys" in applied
            assert await sharded.migrate() == []
            await sharded.load_sealer(keys=())
            for k in keys:
                claim = await sharded.claim(scope="r:t", key=k, fingerprint=b"f",
                                            token=uuid.uuid4(), lease=30, ttl=600)
                assert claim.outcome is ClaimOutcome.EXISTING
                assert claim.record.body == k.encode()
        finally:
            await sharded.close()
        on = [await rows_on_worker(cluster, w, keys) for w in ("worker1", "worker2")]
        assert sum(on) == len(keys) and min(on) > 0
    finally:
        await asyncio.to_thread(cluster.cleanup)


async def test_every_single_key_function_the_store_calls_runs_on_the_keys_worker(
        citus_db: str):
    """Each function the store calls for one key (claim, complete, release, renew) is a
    distributed function colocated with the records, so it runs on the key's worker; a
    migration that adds one without listing it in store/citus.py fails here."""
    from proxy.store import postgres

    called = set()
    for name in ("_CLAIM", "_COMPLETE", "_RELEASE", "_RENEW"):
        called |= set(re.findall(r"(idemproxy_\w+)\(", getattr(postgres, name)))
    conn = await asyncpg.connect(citus_db)
    try:
        distributed = {r["name"] for r in await conn.fetch("""
            SELECT p.proname AS name FROM pg_dist_object o JOIN pg_proc p ON p.oid = o.objid
             WHERE o.classid = 'pg_proc'::regclass AND o.distribution_argument_index = 1
               AND o.colocationid = (SELECT colocationid FROM pg_dist_partition
                                      WHERE logicalrelid = 'idemproxy_keys'::regclass)""")}
    finally:
        await conn.close()
    assert len(called) == 4 and called <= distributed, called - distributed


async def test_notify_from_a_delegated_completion_reaches_the_coordinators_listeners(
        citus_db: str):
    """A completion that runs on the key's worker still wakes a listener on the
    coordinator (`concurrent: wait` across proxies), as does a release."""
    store = await PostgresStore.connect(citus_db, min_size=1, max_size=4, citus=True)
    await store.load_sealer(keys=())
    listener = await asyncpg.connect(citus_db)
    heard: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(CHANNEL, lambda *a: heard.put_nowait(a[3]))
    try:
        for end in ("complete", "release"):
            key, token = uuid.uuid4().hex, uuid.uuid4()
            claim = await store.claim(scope="s:t", key=key, fingerprint=b"f", token=token,
                                      lease=30, ttl=60)
            assert claim.outcome is ClaimOutcome.NEW
            if end == "complete":
                done = Completion(201, (), b"{}", 0, 2, False)
                assert await store.complete(scope="s:t", key=key, token=token, done=done,
                                            notify=True)
            else:
                assert await store.release(scope="s:t", key=key, token=token, notify=True)
            assert await asyncio.wait_for(heard.get(), 10) == notify_channel_id("s:t", key)
    finally:
        await listener.close()
        await store.close()


async def test_citus_refused_on_a_database_without_the_extension(db: str):
    """`sharding: citus` on a database without Citus is refused with a clear message."""
    conn = await asyncpg.connect(db)
    try:
        with pytest.raises(RuntimeFailure, match="no citus extension"):
            await migrate(conn, citus=True)
    finally:
        await conn.close()


async def test_distributed_tables_with_sharding_none_warn(citus_db: str,
                                                          caplog: pytest.LogCaptureFixture):
    """A database Citus distributes, used with `sharding: none`, is served (each
    statement routed by the coordinator) and start-up warns to set `citus`."""
    conn = await asyncpg.connect(citus_db)
    try:
        with caplog.at_level(logging.WARNING, logger="idemproxy.store"):
            assert await migrate(conn) == []
    finally:
        await conn.close()
    assert any("distributed by Citus" in r.getMessage() for r in caplog.records)


async def test_worker_killed_under_load_is_503_for_its_keys_others_carry_on(
        proxies: list[ProxyProcess], module_upstream: TestUpstream, citus_cluster: Any,
        citus_db: str, tmp_path: Path):
    """A worker killed under load: its keys get 503 store-unavailable (never 500), keys
    on the other worker are served, and its keys work again once it is back."""
    keys = [uuid.uuid4().hex for _ in range(24)]
    where = await worker_of(citus_db, keys)
    dead_port = citus_cluster.ports["worker2"]
    dead = [k for k in keys if where[k] == dead_port]
    alive = [k for k in keys if where[k] != dead_port]
    assert dead and alive
    async with aiohttp.ClientSession(headers=CLIENT_AUTH) as client:
        load = asyncio.gather(*[post(client, proxies[i % 3].url + f"/exec/{uuid.uuid4().hex}",
                                     key=uuid.uuid4().hex) for i in range(60)])
        citus_cluster.kill("worker2")
        try:
            under_load = await load
            results = await asyncio.gather(*[
                post(client, proxies[i % 3].url + f"/exec/{k}", key=k)
                for i, k in enumerate(keys)])
        finally:
            citus_cluster.start("worker2")
        assert all(s != 500 for s, _, _ in under_load)
        for k, (status, _, body) in zip(keys, results, strict=True):
            if k in dead:
                assert status == 503, body
                assert b"store-unavailable" in body
            else:
                assert status == 201, body
        # Back: the proxies recover by themselves (no restart).
        again: list[tuple[int, dict[str, str], bytes]] = []
        for _ in range(60):
            again = await asyncio.gather(*[post(client, proxies[0].url + f"/exec/{k}", key=k)
                                           for k in dead])
            if all(s == 201 for s, _, _ in again):
                break
            await asyncio.sleep(0.5)
        assert [s for s, _, _ in again] == [201] * len(dead)
    assert all(module_upstream.count(f"/exec/{k}") == 1 for k in keys)
