"""The connection pool (proxy/store/pool.py), on real PostgreSQL: connections go to waiters
strictly in arrival order, and a connection that may be out of step is never lent again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.errors import StoreUnavailable
from proxy.store.pool import Pool


@pytest.fixture
async def pool(db: str) -> AsyncIterator[Pool]:
    p = Pool(db, min_size=1, max_size=2, timeout=5)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_released_connection_goes_to_the_longest_waiter_not_a_newcomer(db: str):
    """A newcomer arriving right after a release cannot take the connection from a waiter."""
    p = Pool(db, min_size=1, max_size=1, timeout=5)
    await p.start()
    try:
        held = await p.acquire()
        order: list[str] = []

        async def take(name: str) -> None:
            conn = await p.acquire()
            order.append(name)
            p.release(conn)

        waiter = asyncio.create_task(take("waiter"))
        await asyncio.sleep(0.01)
        p.release(held)
        newcomer = asyncio.create_task(take("newcomer"))  # arrives before the waiter runs
        await asyncio.gather(waiter, newcomer)
        assert order == ["waiter", "newcomer"]
    finally:
        await p.close()


async def test_many_waiters_are_served_in_arrival_order(db: str):
    """Fifty callers sharing two connections are each handed one in the order they asked."""
    pool = Pool(db, min_size=2, max_size=2, timeout=5)  # both open: no connect reorders
    await pool.start()
    served: list[int] = []

    async def work(i: int) -> None:
        async with pool.connection() as conn:
            served.append(i)  # the order connections were handed out
            await conn.fetchval("SELECT 1")

    try:
        await asyncio.gather(*[work(i) for i in range(50)])
    finally:
        await pool.close()
    assert served == sorted(served)


async def test_a_waiter_that_times_out_gets_store_unavailable_and_leaves_the_line(db: str):
    """A wait past its timeout raises StoreUnavailable and leaves the freed connection to others."""
    p = Pool(db, min_size=1, max_size=1, timeout=5)
    await p.start()
    try:
        held = await p.acquire()
        with pytest.raises(StoreUnavailable, match="no database connection free"):
            await p.acquire(timeout=0.05)
        p.release(held)
        conn = await p.acquire(timeout=0.05)  # the one connection is free again
        assert await conn.fetchval("SELECT 1") == 1
        p.release(conn)
    finally:
        await p.close()


async def test_a_connection_left_in_a_transaction_is_never_lent_again(pool: Pool):
    """A connection returned mid-transaction is closed; later borrowers get clean, other ones."""
    conn = await pool.acquire()
    await conn.execute("BEGIN")
    await conn.execute("CREATE TEMP TABLE leftover (x int)")
    pid = conn.get_server_pid()
    pool.release(conn)
    assert conn.is_closed()
    for _ in range(3):
        async with pool.connection() as c:
            assert c.get_server_pid() != pid and not c.is_in_transaction()
            assert await c.fetchval("SELECT to_regclass('pg_temp.leftover')") is None


async def test_a_cancelled_query_discards_its_connection_and_a_waiter_gets_a_new_one(db: str):
    """Cancelled mid-statement, the connection may be out of step: it is terminated, and
    the slot passes to the next in line, which opens a fresh connection."""
    p = Pool(db, min_size=1, max_size=1, timeout=5)
    await p.start()
    try:
        async def slow() -> None:
            async with p.connection() as conn:
                await conn.execute("SELECT pg_sleep(10)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.1)
        waiter = asyncio.create_task(p.acquire())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        conn = await asyncio.wait_for(waiter, 5)
        assert await conn.fetchval("SELECT 1") == 1
        p.release(conn)
        assert p.get_size() == 1
    finally:
        await p.close()


async def test_a_sql_error_drops_the_connection(pool: Pool):
    """A connection whose statement failed, even with a plain SQL error, is never lent
    again (issue #13: it may hold a broken statement or sit on a demoted server)."""
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    pool.release(conn)
    with pytest.raises(asyncpg.DivisionByZeroError):
        async with pool.connection() as c:
            await c.fetchval("SELECT 1/0")
    async with pool.connection() as c:
        assert c.get_server_pid() != pid


async def test_a_connection_killed_by_the_server_is_replaced(pool: Pool, db: str):
    """An idle connection the server terminated is never lent; borrowers get a new, working one."""
    conn = await pool.acquire()
    pid = conn.get_server_pid()
    pool.release(conn)
    killer = await asyncpg.connect(db)
    try:
        await killer.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await killer.close()
    await asyncio.sleep(0.1)  # the client side notices the closed socket
    for _ in range(3):
        async with pool.connection() as c:
            assert c.get_server_pid() != pid
            assert await c.fetchval("SELECT 1") == 1


async def test_close_fails_waiters_and_later_borrowers(db: str):
    """close() fails waiters and later acquires with StoreUnavailable; a lent one dies on return."""
    p = Pool(db, min_size=1, max_size=1, timeout=5)
    await p.start()
    held = await p.acquire()
    waiter = asyncio.create_task(p.acquire())
    await asyncio.sleep(0.01)
    await p.close()
    with pytest.raises(StoreUnavailable):
        await waiter
    with pytest.raises(StoreUnavailable):
        await p.acquire()
    p.release(held)  # a connection lent before close is terminated on return
    assert held.is_closed() and p.get_size() == 0


async def test_start_fails_on_an_unreachable_database():
    """A refused connection at start-up is StoreUnavailable, and no slot stays taken."""
    p = Pool("postgresql://nobody@127.0.0.1:1/none", min_size=1, max_size=2, timeout=2)
    with pytest.raises(StoreUnavailable):
        await p.start()
    assert p.get_size() == 0


async def test_connections_idle_past_max_idle_are_closed_down_to_min_size(db: str,
                                                                         monkeypatch):
    """After a burst the pool shrinks again: like asyncpg's inactive-connection lifetime,
    so replicas x workers x pool_max is not held open forever."""
    from proxy.store import pool as pool_module
    p = Pool(db, min_size=1, max_size=3, timeout=5)
    await p.start()
    try:
        burst = [await p.acquire() for _ in range(3)]
        for conn in burst:
            p.release(conn)
        assert p.get_size() == 3
        monkeypatch.setattr(pool_module, "MAX_IDLE", 0.05)
        await asyncio.sleep(0.1)
        for _ in range(4):  # each release closes the stalest idle connection
            async with p.connection() as conn:
                await conn.fetchval("SELECT 1")
        assert p.get_size() == 1
        async with p.connection() as conn:
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await p.close()
