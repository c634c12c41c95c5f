"""LISTEN/NOTIFY fan-out: one listening connection per process, reconnecting when the
database goes away, waking in-process waiters without a connection each."""

from __future__ import annotations

import asyncio

import asyncpg

from proxy.store.notify import Notifier
from proxy.store.postgres import PostgresStore, notify_channel_id
from tests.procs import DedicatedPostgres


async def _notify(url: str, payload: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_notify('idemproxy', $1)", payload)
    finally:
        await conn.close()


async def test_waiters_are_woken_by_notify(db: str):
    """A notification for a key resolves every waiter on that key, and only those."""
    store = await PostgresStore.connect(db, min_size=1, max_size=2)
    try:
        async with Notifier(store.acquire_listener) as notifier:
            await asyncio.wait_for(notifier.connected.wait(), 5)
            key_id, other_id = notify_channel_id("s", "k"), notify_channel_id("s", "other")
            with notifier.waiter(key_id) as a, notifier.waiter(key_id) as b, \
                    notifier.waiter(other_id) as c:
                assert notifier.waiting == 3
                await _notify(db, key_id)
                await asyncio.wait_for(asyncio.gather(a, b), 5)
                assert not c.done()
            assert notifier.waiting == 0
    finally:
        await store.close()


async def test_listener_reconnects_after_database_restart(own_pg: DedicatedPostgres):
    """The listening connection comes back by itself after Postgres restarts, and a
    waiter registered across the outage is woken (missed notifications wake everyone)."""
    store = await PostgresStore.connect(own_pg.url, min_size=0, max_size=2, timeout=2)
    try:
        async with Notifier(store.acquire_listener) as notifier:
            await asyncio.wait_for(notifier.connected.wait(), 5)
            key_id = notify_channel_id("s", "restart")
            with notifier.waiter(key_id) as fut:
                await asyncio.to_thread(own_pg.stop)
                for _ in range(100):
                    if not notifier.connected.is_set():
                        break
                    await asyncio.sleep(0.1)
                assert not notifier.connected.is_set()
                await asyncio.to_thread(own_pg.start)
                await asyncio.wait_for(notifier.connected.wait(), 20)
                await asyncio.wait_for(fut, 5)
            with notifier.waiter(key_id) as fut2:
                await _notify(own_pg.url, key_id)
                await asyncio.wait_for(fut2, 5)
    finally:
        await store.close()
