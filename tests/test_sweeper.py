"""The expiry sweeper: expired rows go in batches, one replica at a time."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from proxy.store import Completion
from proxy.store.postgres import PostgresStore
from proxy.store.sweeper import _LOCK_ID, run_sweeper, sweep_once


@pytest.fixture
def db(layout_db: str) -> str:
    """This module's tests run on one node and on a Citus cluster (issue #29)."""
    return layout_db


async def _expired_rows(store: PostgresStore, n: int) -> str:
    scope = f"sweep:{uuid.uuid4().hex[:8]}"
    for i in range(n):
        c = await store.claim(scope=scope, key=str(i), fingerprint=b"f", token=uuid.uuid4(),
                              lease=10, ttl=0.05)
        await store.complete(scope=scope, key=str(i), token=c.record.lock_token,
                             done=Completion(200, (), b"x", 0, 1, False), notify=False)
    await asyncio.sleep(0.1)
    return scope


async def _count(db: str, scope: str) -> int:
    conn = await asyncpg.connect(db)
    try:
        n: int = await conn.fetchval("SELECT count(*) FROM idemproxy_keys WHERE scope = $1",
                                     scope)
        return n
    finally:
        await conn.close()


async def test_sweep_deletes_expired_rows_in_batches(db: str, store: PostgresStore):
    """One pass removes every expired row, batch after batch."""
    scope = await _expired_rows(store, 25)
    assert await sweep_once(store, batch=10) >= 25
    assert await _count(db, scope) == 0


async def test_only_one_replica_sweeps_at_a_time(db: str, store: PostgresStore):
    """While another replica holds the sweeper lock, a pass does nothing."""
    scope = await _expired_rows(store, 3)
    other = await asyncpg.connect(db)
    try:
        assert await other.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_ID)
        assert await sweep_once(store) == 0
        assert await _count(db, scope) == 3
        await other.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        assert await sweep_once(store) >= 3
    finally:
        await other.close()


async def test_background_sweeper_runs_on_its_interval(db: str, store: PostgresStore):
    """run_sweeper deletes expired rows on its own and reports how many."""
    deleted: list[int] = []
    task = asyncio.create_task(run_sweeper(store, interval=0.1, lease=1.0,
                                           on_deleted=deleted.append))
    try:
        for _ in range(20):  # another sweeper on this database may win a round: go again
            scope = await _expired_rows(store, 4)
            for _ in range(30):
                if await _count(db, scope) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await _count(db, scope) == 0
            if deleted:
                break
    finally:
        task.cancel()
    assert sum(deleted) >= 1
