"""The store against real PostgreSQL: race-safe claims, fencing, leases, expiry."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from proxy.store import Beat, ClaimOutcome, Completion, State
from proxy.store.postgres import PostgresStore


@pytest.fixture
def db(layout_db: str) -> str:
    """This module's tests run on one node and on a Citus cluster (issue #29)."""
    return layout_db

FP = b"\x01" * 32
DONE = Completion(201, (("Content-Type", "text/plain"), ("X-Multi", "a"), ("X-Multi", "b")),
                  b"hello", 0, 5, False)


def ids() -> tuple[str, str]:
    return f"test:{uuid.uuid4().hex[:8]}", uuid.uuid4().hex


async def claim(store: PostgresStore, scope: str, key: str, *, fp: bytes = FP,
                lease: float = 30, ttl: float = 3600, token: uuid.UUID | None = None,
                seen: Beat | None = None):
    return await store.claim(scope=scope, key=key, fingerprint=fp, token=token or uuid.uuid4(),
                             lease=lease, ttl=ttl, seen=seen)


async def test_claim_race_under_read_committed_has_one_winner(db: str):
    """Many connections claiming one key at once: exactly one NEW, every other sees the row."""
    stores = [await PostgresStore.connect(db, min_size=1, max_size=1) for _ in range(12)]
    try:
        for _ in range(30):  # repeat: the race window is small
            scope, key = ids()
            results = await asyncio.gather(*[claim(s, scope, key) for s in stores])
            outcomes = [r.outcome for r in results]
            assert outcomes.count(ClaimOutcome.NEW) == 1
            assert outcomes.count(ClaimOutcome.EXISTING) == len(stores) - 1
            winner = next(r for r in results if r.outcome is ClaimOutcome.NEW)
            assert all(r.record.lock_token == winner.record.lock_token for r in results)
            assert all(r.record.state is State.IN_FLIGHT for r in results)
    finally:
        for s in stores:
            await s.close()


async def test_default_isolation_is_read_committed(db: str):
    """The race test above runs under READ COMMITTED, the default the claim must survive."""
    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SHOW transaction_isolation") == "read committed"
    finally:
        await conn.close()


@pytest.mark.parametrize("notify", [False, True])  # a plain UPDATE, or the function
async def test_complete_then_claim_returns_stored_response(store: PostgresStore,
                                                           notify: bool):
    """A completed key comes back with status, ordered multi-value headers and body."""
    scope, key = ids()
    c = await claim(store, scope, key)
    assert await store.complete(scope=scope, key=key, token=c.record.lock_token, done=DONE,
                                notify=notify)
    again = await claim(store, scope, key)
    assert again.outcome is ClaimOutcome.EXISTING and again.record.state is State.COMPLETED
    assert again.record.status == 201 and again.record.body == b"hello"
    assert again.record.headers == DONE.headers


@pytest.mark.parametrize("notify", [False, True])
async def test_complete_with_wrong_token_is_refused(store: PostgresStore, notify: bool):
    """Completion is a compare-and-set on the claim's lock token."""
    scope, key = ids()
    await claim(store, scope, key)
    assert not await store.complete(scope=scope, key=key, token=uuid.uuid4(), done=DONE,
                                    notify=notify)
    again = await claim(store, scope, key)
    assert again.record.state is State.IN_FLIGHT


async def test_takeover_after_lease_and_zombie_cannot_overwrite(store: PostgresStore):
    """After the lease ends another claim presenting the heartbeat it saw (proxy/
    store/sightings.py) takes over; the old owner's late write is refused."""
    scope, key = ids()
    zombie = await claim(store, scope, key, lease=0.2)
    live = await claim(store, scope, key)
    assert live.outcome is ClaimOutcome.EXISTING  # lease still running
    await asyncio.sleep(0.3)
    new_owner = await claim(store, scope, key, seen=live.record.beat)
    assert new_owner.outcome is ClaimOutcome.TAKEN_OVER
    assert not await store.complete(scope=scope, key=key, token=zombie.record.lock_token,
                                    done=Completion(500, (), b"zombie", 0, 6, False), notify=False)
    assert await store.complete(scope=scope, key=key, token=new_owner.record.lock_token,
                                done=DONE, notify=False)
    final = await claim(store, scope, key)
    assert final.record.body == b"hello"


async def test_takeover_race_has_one_winner(db: str):
    """Several proxies taking over one dead claim at once: exactly one wins."""
    stores = [await PostgresStore.connect(db, min_size=1, max_size=1) for _ in range(8)]
    try:
        scope, key = ids()
        await claim(stores[0], scope, key, lease=0.1)
        seen = (await claim(stores[1], scope, key)).record.beat
        await asyncio.sleep(0.2)
        results = await asyncio.gather(*[claim(s, scope, key, seen=seen) for s in stores])
        outcomes = [r.outcome for r in results]
        assert outcomes.count(ClaimOutcome.TAKEN_OVER) == 1
        assert outcomes.count(ClaimOutcome.EXISTING) == len(stores) - 1
    finally:
        for s in stores:
            await s.close()


async def test_lease_end_with_other_fingerprint_is_not_taken_over(store: PostgresStore):
    """A dead claim is only taken over by the same request, never a different payload."""
    scope, key = ids()
    await claim(store, scope, key, lease=0.1)
    seen = (await claim(store, scope, key)).record.beat
    await asyncio.sleep(0.2)
    other = await claim(store, scope, key, fp=b"\x02" * 32, seen=seen)
    assert other.outcome is ClaimOutcome.EXISTING and other.record.fingerprint == FP


async def test_expired_rows_are_absent_on_read(store: PostgresStore):
    """A row past its ttl is treated as new, whatever its state or fingerprint."""
    scope, key = ids()
    c = await claim(store, scope, key, ttl=0.2)
    await store.complete(scope=scope, key=key, token=c.record.lock_token, done=DONE, notify=False)
    await asyncio.sleep(0.3)
    again = await claim(store, scope, key, fp=b"\x03" * 32)
    assert again.outcome is ClaimOutcome.NEW


async def test_release_deletes_only_own_in_flight_claim(store: PostgresStore):
    """Release is fenced too: another token cannot release, the owner can."""
    scope, key = ids()
    c = await claim(store, scope, key)
    assert not await store.release(scope=scope, key=key, token=uuid.uuid4(), notify=False)
    assert await store.release(scope=scope, key=key, token=c.record.lock_token, notify=False)
    assert (await claim(store, scope, key)).outcome is ClaimOutcome.NEW


async def test_chunked_body_round_trip(store: PostgresStore):
    """Bodies stored as chunk rows stream back in order, byte-exact."""
    scope, key = ids()
    c = await claim(store, scope, key)
    token = c.record.lock_token
    parts = [bytes([i]) * 1000 for i in range(5)]
    for seq, part in enumerate(parts):
        await store.write_chunk(scope=scope, key=key, token=token, seq=seq, data=part)
    await store.complete(scope=scope, key=key, token=token,
                         done=Completion(200, (), None, 5, 5000, False), notify=False)
    got = [bytes(c) async for c in store.read_chunks(scope=scope, key=key, token=token)]
    assert got == parts


async def test_purge_deletes_expired_rows_and_their_chunks(store: PostgresStore):
    """The sweeper's purge removes expired records and their body chunks, nothing else."""
    scope, key = ids()
    keep_scope, keep_key = ids()
    c = await claim(store, scope, key, ttl=0.1, lease=0.1)
    await store.write_chunk(scope=scope, key=key, token=c.record.lock_token, seq=0, data=b"x")
    await store.complete(scope=scope, key=key, token=c.record.lock_token,
                         done=Completion(200, (), None, 1, 1, False), notify=False)
    await claim(store, keep_scope, keep_key)
    await asyncio.sleep(0.2)
    assert await store.purge(batch=10000) >= 1
    assert await store.show(scope=scope, key=key) is None
    assert await store.show(scope=keep_scope, key=keep_key) is not None
    chunks = [x async for x in store.read_chunks(scope=scope, key=key, token=c.record.lock_token)]
    assert chunks == []


async def test_completion_notifies_only_when_asked(store: PostgresStore, db: str):
    """complete(notify=True) sends one NOTIFY for the key; notify=False sends none."""
    from proxy.store.postgres import notify_channel_id

    got: list[str] = []
    listener = await asyncpg.connect(db)
    await listener.add_listener("idemproxy", lambda *args: got.append(args[-1]))
    try:
        for notify in (False, True):
            scope, key = ids()
            c = await claim(store, scope, key)
            await store.complete(scope=scope, key=key, token=c.record.lock_token, done=DONE,
                                 notify=notify)
            await listener.execute("SELECT 1")  # notifications arrive before this answers
            await asyncio.sleep(0.05)
            assert got == ([notify_channel_id(scope, key)] if notify else [])
    finally:
        await listener.close()


async def test_pooled_connection_left_in_a_transaction_is_not_reused(store: PostgresStore):
    """A connection released mid-transaction never serves another call."""
    async with store.connection() as conn:
        await conn.execute("BEGIN")
        await conn.execute("CREATE TEMP TABLE leftover (x int)")
    for _ in range(store.pool.get_size()):
        async with store.connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.leftover')") is None
