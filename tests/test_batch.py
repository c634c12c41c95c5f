"""Batched claims and completions (proxy/store/batch.py, migration 0004), on real
PostgreSQL: calls that queue for a busy pool share one statement and one transaction,
and keep every promise of a call on its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from proxy.errors import StoreFailed, StoreUnavailable
from proxy.metrics import Metrics
from proxy.store import ClaimOutcome, State
from proxy.store.postgres import PostgresStore
from tests.test_store import DONE, claim, ids


@pytest.fixture(autouse=True)
async def _clean(db: str) -> AsyncIterator[None]:
    """These tests leave claims in flight; remove them so later tests that list in-flight
    claims (the admin API, limit 100) do not see hundreds of strangers."""
    conn = await asyncpg.connect(db)
    try:
        start = await conn.fetchval("SELECT clock_timestamp()")
        yield
        await conn.execute("DELETE FROM idemproxy_keys WHERE scope LIKE 'test:%' "
                           "AND created_at >= $1", start)
    finally:
        await conn.close()


@pytest.fixture
async def one_conn(db: str) -> AsyncIterator[PostgresStore]:
    """A store whose pool has one connection, so a test can make calls queue."""
    store = await PostgresStore.connect(db, min_size=1, max_size=1)
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def busy(store: PostgresStore) -> AsyncIterator[None]:
    """Hold the pool's only connection for the block: calls made inside it queue."""
    conn = await store.pool.acquire()
    try:
        yield
        await asyncio.sleep(0.05)  # let every call started in the block reach the queue
    finally:
        store.pool.release(conn)


async def xmins(db: str, scope: str) -> list[str]:
    """The transaction ids that wrote a scope's rows, one per row."""
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch("SELECT xmin::text AS x FROM idemproxy_keys WHERE scope = $1",
                                scope)
        return [r["x"] for r in rows]
    finally:
        await conn.close()


async def test_claims_queued_behind_a_busy_pool_share_one_transaction(
        one_conn: PostgresStore, db: str):
    """Twenty claims queued behind a held connection all come back NEW, written by one commit."""
    scope, _ = ids()
    keys = [f"k{i}" for i in range(20)]
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, k)) for k in keys]
    results = await asyncio.gather(*tasks)
    assert [r.outcome for r in results] == [ClaimOutcome.NEW] * 20
    written = await xmins(db, scope)
    assert len(written) == 20 and len(set(written)) == 1  # one commit for twenty claims


async def test_a_call_with_a_free_connection_runs_alone(one_conn: PostgresStore, db: str):
    """Claims made one at a time, with nothing queued, each commit in a transaction of their own."""
    scope, _ = ids()
    for i in range(3):
        assert (await claim(one_conn, scope, f"k{i}")).outcome is ClaimOutcome.NEW
    assert len(set(await xmins(db, scope))) == 3


async def test_duplicates_in_one_batch_get_one_owner(one_conn: PostgresStore):
    """The later claims of a key in a batch see the earlier one: in flight, its token."""
    scope, key = ids()
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, key)) for _ in range(10)]
    results = await asyncio.gather(*tasks)
    winners = [r for r in results if r.outcome is ClaimOutcome.NEW]
    assert len(winners) == 1
    token = winners[0].record.lock_token
    for r in results:
        assert r.record.lock_token == token and r.record.state is State.IN_FLIGHT


async def test_completed_keys_replay_from_a_batch(one_conn: PostgresStore):
    """Batched claims of a completed key each get its stored record, with its body and headers."""
    scope, key = ids()
    c = await claim(one_conn, scope, key)
    assert await one_conn.complete(scope=scope, key=key, token=c.record.lock_token,
                                   done=DONE, notify=False)
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, key)) for _ in range(5)]
    for r in await asyncio.gather(*tasks):
        assert r.outcome is ClaimOutcome.EXISTING and r.record.state is State.COMPLETED
        assert r.record.body == b"hello" and r.record.headers == DONE.headers


async def test_a_batched_new_claim_answers_as_a_claim_alone(one_conn: PostgresStore):
    """A new key claimed in a batch (migration 0007's INSERT first) returns what a claim on
    its own returns: NEW, in flight, its token and fingerprint, the lease and the window."""
    scope, _ = ids()
    alone = await claim(one_conn, scope, "alone", fp=b"f" * 32, lease=7, ttl=600)
    tokens = [uuid.uuid4() for _ in range(3)]
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, f"b{i}", fp=b"f" * 32, lease=7,
                                           ttl=600, token=t)) for i, t in enumerate(tokens)]
    for r, token in zip(await asyncio.gather(*tasks), tokens, strict=True):
        assert r.outcome is ClaimOutcome.NEW and r.record.lock_token == token
        assert r.record._replace(lock_token=alone.record.lock_token,
                                 expires_at=alone.record.expires_at) == alone.record
        assert abs((r.record.expires_at - alone.record.expires_at).total_seconds()) < 60


async def test_rows_to_take_over_are_taken_over_in_a_batch(one_conn: PostgresStore):
    """In a batch, an expired row is claimed anew and an ended lease of the same request is
    taken over (each with the heartbeat seen on it), next to new keys and a live claim (409
    material), each as alone."""
    scope, _ = ids()
    await claim(one_conn, scope, "expired", ttl=0.01, lease=0.01)
    await claim(one_conn, scope, "lease-ended", lease=0.01)
    live = await claim(one_conn, scope, "live")
    await asyncio.sleep(0.05)
    names = ["expired", "lease-ended", "live", "new"]
    seen = {k: (await claim(one_conn, scope, k)).record.beat for k in names[:3]}
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, k, seen=seen.get(k)))
                 for k in names]
    got = dict(zip(names, await asyncio.gather(*tasks), strict=True))
    assert got["expired"].outcome is ClaimOutcome.NEW
    assert got["lease-ended"].outcome is ClaimOutcome.TAKEN_OVER
    assert got["live"].outcome is ClaimOutcome.EXISTING
    assert got["live"].record.lock_token == live.record.lock_token
    assert got["new"].outcome is ClaimOutcome.NEW


async def test_completions_share_one_transaction_and_keep_compare_and_set(
        one_conn: PostgresStore, db: str):
    """Queued completions commit together; one with a stale token is refused and stays in flight."""
    scope, _ = ids()
    claims = [await claim(one_conn, scope, f"k{i}") for i in range(5)]
    tokens = [c.record.lock_token for c in claims]
    tokens[2] = uuid.uuid4()  # no longer the owner (say, taken over)
    async with busy(one_conn):
        tasks = [asyncio.create_task(one_conn.complete(
            scope=scope, key=f"k{i}", token=tokens[i], done=DONE, notify=False))
            for i in range(5)]
    assert await asyncio.gather(*tasks) == [True, True, False, True, True]
    conn = await asyncpg.connect(db)
    try:
        rows = await conn.fetch("SELECT key, state, xmin::text AS x FROM idemproxy_keys "
                                "WHERE scope = $1 ORDER BY key", scope)
    finally:
        await conn.close()
    assert [r["state"] for r in rows] == [2, 2, 1, 2, 2]
    assert len({r["x"] for r in rows if r["state"] == 2}) == 1


async def test_a_failing_call_fails_alone(one_conn: PostgresStore, db: str,
                                          caplog: pytest.LogCaptureFixture):
    """Postgres refuses a NUL in text: the batch rolls back whole, and each call is re-run
    on its own, so only the bad one fails (StoreFailed, the SQL error as its cause) and
    each good one is written once."""
    scope, _ = ids()
    keys = ["a", "b", "bad\x00key", "c"]
    async with busy(one_conn):
        tasks = [asyncio.create_task(claim(one_conn, scope, k)) for k in keys]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], StoreFailed)
    assert isinstance(results[2].__cause__, asyncpg.PostgresError)
    assert all(not isinstance(r, BaseException) and r.outcome is ClaimOutcome.NEW
               for i, r in enumerate(results) if i != 2)
    assert len(set(await xmins(db, scope))) == 3  # three calls, three transactions
    assert "running each alone" in caplog.text
    assert (await claim(one_conn, scope, "d")).outcome is ClaimOutcome.NEW  # pool fine


async def test_a_caller_that_gives_up_while_queued_never_runs(one_conn: PostgresStore,
                                                              db: str):
    """A claim cancelled while queued writes no row; the claims queued around it still succeed."""
    scope, _ = ids()
    async with busy(one_conn):
        tasks = {k: asyncio.create_task(claim(one_conn, scope, k)) for k in "abc"}
        await asyncio.sleep(0.01)
        tasks["b"].cancel()
    assert (await tasks["a"]).outcome is ClaimOutcome.NEW
    assert (await tasks["c"]).outcome is ClaimOutcome.NEW
    with pytest.raises(asyncio.CancelledError):
        await tasks["b"]
    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SELECT array_agg(key ORDER BY key) FROM idemproxy_keys "
                                   "WHERE scope = $1", scope) == ["a", "c"]
    finally:
        await conn.close()


async def test_a_connection_lost_mid_batch_fails_every_call_then_recovers(
        one_conn: PostgresStore, db: str):
    """Kill the backend while a batch waits on a row lock: every call in it gets
    StoreUnavailable (nothing it did is kept), and the next call gets a new connection."""
    scope, _ = ids()
    blocker = await asyncpg.connect(db)
    watcher = await asyncpg.connect(db)  # pg_stat_activity is frozen within a transaction
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(  # an uncommitted row for "m": a claim of it must wait
            "INSERT INTO idemproxy_keys (scope, key, fingerprint, state, lock_token, "
            "locked_until, expires_at) VALUES ($1, 'm', '\\x00', 1, gen_random_uuid(), "
            "now() + interval '1 minute', now() + interval '1 hour')", scope)
        async with busy(one_conn):
            tasks = [asyncio.create_task(claim(one_conn, scope, k)) for k in "amz"]
        for _ in range(100):
            waiting = await watcher.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%idemproxy_claim2_many%'")
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "the batch never waited on the row lock"
        await watcher.execute("SELECT pg_terminate_backend($1)", waiting)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        await tx.rollback()
        assert await blocker.fetchval(
            "SELECT count(*) FROM idemproxy_keys WHERE scope = $1", scope) == 0
    finally:
        await blocker.close()
        await watcher.close()
    assert (await claim(one_conn, scope, "a")).outcome is ClaimOutcome.NEW


async def test_overlapping_batches_from_two_stores_never_deadlock(
        db: str, caplog: pytest.LogCaptureFixture):
    """Two processes' worth of batches claiming the same keys in random orders: each key
    has one owner, and no batch hits a deadlock (each takes its locks in key order)."""
    sizes: list[int] = []
    stores = [await PostgresStore.connect(db, min_size=3, max_size=3,
                                          observe_batch=lambda op, n: sizes.append(n))
              for _ in range(2)]
    caplog.set_level(logging.WARNING, logger="idemproxy.store")
    try:
        for _ in range(5):
            scope, _ = ids()
            calls = [(s, f"k{i:02d}") for s in stores for i in range(30) for _ in range(4)]
            random.shuffle(calls)
            results = await asyncio.gather(*[claim(s, scope, k) for s, k in calls])
            owners: dict[str, int] = {}
            for (_, k), r in zip(calls, results, strict=True):
                owners[k] = owners.get(k, 0) + (r.outcome is ClaimOutcome.NEW)
            assert set(owners.values()) == {1}
        assert max(sizes) > 1  # batches did form
        assert "DeadlockDetected" not in caplog.text
    finally:
        for s in stores:
            await s.close()


async def test_closing_the_store_fails_queued_calls(db: str):
    """Calls still queued at shutdown get StoreUnavailable (a 503), not a hang or a
    CancelledError in somebody else's request."""
    store = await PostgresStore.connect(db, min_size=1, max_size=1)
    conn = await store.pool.acquire()
    scope, _ = ids()
    tasks = [asyncio.create_task(claim(store, scope, k)) for k in "ab"]
    await asyncio.sleep(0.05)
    await store.close()
    store.pool.release(conn)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results), results


async def test_one_statement_of_a_kind_runs_at_once(db: str):
    """Free connections do not stop calls from batching: while one claim statement runs,
    claims queue for the next batch (group commit), so twenty cost a few commits."""
    store = await PostgresStore.connect(db, min_size=10, max_size=10)
    try:
        scope, _ = ids()
        results = await asyncio.gather(*[claim(store, scope, f"k{i}") for i in range(20)])
        assert all(r.outcome is ClaimOutcome.NEW for r in results)
        assert len(set(await xmins(db, scope))) <= 2  # one alone, then the rest together
    finally:
        await store.close()


async def test_batch_sizes_are_a_metric(db: str):
    """Five claims batched together are observed once in the claim batch-size histogram, sum 5."""
    metrics = Metrics(CollectorRegistry())
    store = await PostgresStore.connect(db, min_size=1, max_size=1,
                                        observe_batch=metrics.observe_batch)
    try:
        scope, _ = ids()
        async with busy(store):
            tasks = [asyncio.create_task(claim(store, scope, f"k{i}")) for i in range(5)]
        await asyncio.gather(*tasks)
        sample = metrics.registry.get_sample_value
        assert sample("idemproxy_store_batch_size_count", {"op": "claim"}) == 1
        assert sample("idemproxy_store_batch_size_sum", {"op": "claim"}) == 5
    finally:
        await store.close()


async def test_batches_claiming_the_same_keys_in_opposite_orders_do_not_deadlock(
        db: str, caplog: pytest.LogCaptureFixture):
    """Two processes' batches arrive as [b, g1, a] and [a, g2, b]; an uncommitted row
    holds each at its gate until both are waiting. Taken in arrival order they would
    each hold one of a, b and wait for the other (a deadlock, one batch rolled back);
    in key order, the second waits behind the first and both complete."""
    caplog.set_level(logging.WARNING, logger="idemproxy.store")
    scope, _ = ids()
    stores = [await PostgresStore.connect(db, min_size=1, max_size=1) for _ in range(2)]
    blocker, watcher = await asyncpg.connect(db), await asyncpg.connect(db)
    try:
        tx = blocker.transaction()
        await tx.start()
        for gate in ("g1", "g2"):  # uncommitted rows: a claim of a gate waits here
            await blocker.execute(
                "INSERT INTO idemproxy_keys (scope, key, fingerprint, state, lock_token, "
                "locked_until, expires_at) VALUES ($1, $2, '\\x00', 1, gen_random_uuid(), "
                "now() + interval '1 minute', now() + interval '1 hour')", scope, gate)
        held = [await s.pool.acquire() for s in stores]
        tasks = [asyncio.create_task(claim(s, scope, k))
                 for s, keys in zip(stores, (["b", "g1", "a"], ["a", "g2", "b"]), strict=True)
                 for k in keys]
        await asyncio.sleep(0.05)  # every claim queued, in that order
        for s, conn in zip(stores, held, strict=True):
            s.pool.release(conn)
        for _ in range(200):
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%idemproxy_claim2_many%'")
            if waiting == 2:
                break
            await asyncio.sleep(0.01)
        assert waiting == 2, "both batches should be waiting before the gates open"
        await tx.rollback()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        keys = ["b", "g1", "a", "a", "g2", "b"]
        for k in ("a", "b"):
            owners = [r for key, r in zip(keys, results, strict=True)
                      if key == k and r.outcome is ClaimOutcome.NEW]
            assert len(owners) == 1
        assert "DeadlockDetected" not in caplog.text
    finally:
        await blocker.close()
        await watcher.close()
        for s in stores:
            await s.close()
