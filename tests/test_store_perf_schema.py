"""The cheaper claim (migration 0003) keeps every promise of the one it replaced.

Race safety under READ COMMITTED with claimers on many connections, completion as a
compare-and-set on the lock token, the same result columns, and an upgrade from 0002 on
a database that holds rows while a proxy is connected. No timing here: loadtest/ measures.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from proxy.store import ClaimOutcome, Completion, State
from proxy.store import migrate as migrate_module
from proxy.store.migrate import SCHEMA_VERSION, current_version, migrate, migrations
from proxy.store.postgres import PostgresStore
from tests.test_store import claim, ids

DONE = Completion(201, (("Content-Type", "application/json"),), b'{"ok":true}', 0, 11, False)
CLAIM_COLUMNS = [
    ("outcome", "int2"), ("state", "int2"), ("fingerprint", "bytea"), ("status", "int4"),
    ("headers", "bytea"), ("body", "bytea"), ("body_chunks", "int4"), ("body_size", "int8"),
    ("body_omitted", "bool"), ("lock_token", "uuid"), ("expires_at", "timestamptz"),
    ("lease_left", "float8")]


@pytest.fixture
async def racers(db: str) -> AsyncIterator[list[PostgresStore]]:
    """Twelve stores of one connection each: twelve sessions claiming at once."""
    stores = [await PostgresStore.connect(db, min_size=1, max_size=1) for _ in range(12)]
    yield stores
    for s in stores:
        await s.close()


@pytest.fixture
async def fresh_db(db: str) -> AsyncIterator[str]:
    """An empty database on the test server, dropped afterwards."""
    name = "idemproxy_perf_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        yield urlunsplit(urlsplit(db)._replace(path="/" + name))
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


async def test_twelve_claimers_of_an_expired_key_have_one_winner(racers: list[PostgresStore]):
    """12 sessions claiming a key whose row expired: one takes it over as NEW, one owner."""
    for _ in range(5):
        scope, key = ids()
        old = await claim(racers[0], scope, key, ttl=0.1)
        assert await racers[0].complete(scope=scope, key=key, token=old.record.lock_token,
                                        done=DONE, notify=False)
        await asyncio.sleep(0.15)
        results = await asyncio.gather(*[claim(s, scope, key) for s in racers])
        outcomes = [r.outcome for r in results]
        assert outcomes.count(ClaimOutcome.NEW) == 1
        assert outcomes.count(ClaimOutcome.EXISTING) == len(racers) - 1
        winner = next(r for r in results if r.outcome is ClaimOutcome.NEW)
        assert winner.record.lock_token != old.record.lock_token
        assert {r.record.lock_token for r in results} == {winner.record.lock_token}
        assert all(r.record.state is State.IN_FLIGHT and r.record.body is None
                   for r in results)


async def test_claimers_racing_a_release_never_hand_the_key_to_two_owners(
        racers: list[PostgresStore]):
    """A row deleted between a claimer's reads sends it round again, never to a second NEW."""
    for _ in range(10):
        scope, key = ids()
        first = await claim(racers[0], scope, key)
        old = first.record.lock_token
        release = racers[0].release(scope=scope, key=key, token=old, notify=False)
        results = await asyncio.gather(release, *[claim(s, scope, key) for s in racers[1:]])
        claims = results[1:]
        new = [c for c in claims if c.outcome is ClaimOutcome.NEW]
        assert len(new) <= 1
        owners = {old} | {c.record.lock_token for c in new}
        assert all(c.record.lock_token in owners for c in claims)


async def test_completion_is_a_compare_and_set_on_the_lock_token(store: PostgresStore):
    """Only the live token completes, once; a wrong or a taken-over token changes nothing."""
    scope, key = ids()
    zombie = await claim(store, scope, key, lease=0.1)
    seen = (await claim(store, scope, key)).record.beat
    await asyncio.sleep(0.15)
    owner = await claim(store, scope, key, seen=seen)
    assert owner.outcome is ClaimOutcome.TAKEN_OVER
    for token in (uuid.uuid4(), zombie.record.lock_token):
        assert not await store.complete(scope=scope, key=key, token=token, done=DONE,
                                        notify=False)
    assert (await claim(store, scope, key)).record.state is State.IN_FLIGHT
    token = owner.record.lock_token
    assert await store.complete(scope=scope, key=key, token=token, done=DONE, notify=False)
    late = Completion(500, (), b"late", 0, 4, False)
    assert not await store.complete(scope=scope, key=key, token=token, done=late, notify=False)
    replay = await claim(store, scope, key)
    assert replay.outcome is ClaimOutcome.EXISTING and replay.record.status == 201
    assert replay.record.body == DONE.body and replay.record.lock_token == token


async def test_claim_returns_the_columns_it_always_returned(store: PostgresStore):
    """`SELECT * FROM idemproxy_claim(...)` has the same names and types as before 0003."""
    async with store.connection() as conn:
        stmt = await conn.prepare("SELECT * FROM idemproxy_claim($1, $2, $3, $4, $5, $6)")
        got = [(a.name, a.type.name) for a in stmt.get_attributes()]
    assert got == CLAIM_COLUMNS


async def test_upgrade_from_0002_keeps_rows_and_a_connected_proxy_working(
        fresh_db: str, monkeypatch: pytest.MonkeyPatch):
    """Rows written under 0002 replay after the upgrade, through the proxy's old session.

    Three replicas migrate at once (the advisory lock lets one apply each file), while a
    store that prepared its claim against 0002 keeps its connection."""
    at_0002 = [m for m in migrations() if m[0] <= 2]
    monkeypatch.setattr(migrate_module, "migrations", lambda: at_0002)
    conn = await asyncpg.connect(fresh_db)
    try:
        assert await migrate(conn) == [name for _, name, _ in at_0002]
    finally:
        await conn.close()
    monkeypatch.undo()

    store = await PostgresStore.connect(fresh_db, min_size=1, max_size=1)
    try:
        done_scope, done_key = ids()
        c = await old_claim(store, done_scope, done_key)
        assert await store.complete(scope=done_scope, key=done_key,
                                    token=c["lock_token"], done=DONE, notify=False)
        live_scope, live_key = ids()
        live = await old_claim(store, live_scope, live_key)

        replicas = [await asyncpg.connect(fresh_db) for _ in range(3)]
        try:
            applied = await asyncio.gather(*[migrate(r) for r in replicas])
            assert await current_version(replicas[0]) == SCHEMA_VERSION >= 3
        finally:
            for r in replicas:
                await r.close()
        later = [name for v, name, _ in migrations() if v > 2]
        assert sorted(applied, key=len) == [[]] * (len(replicas) - 1) + [later]

        old = await old_claim(store, done_scope, done_key)  # its prepared statement
        assert (old["outcome"], old["state"], old["body"]) == (3, 2, DONE.body)
        replay = await claim(store, done_scope, done_key)  # this version's claim
        assert replay.outcome is ClaimOutcome.EXISTING
        assert replay.record.state is State.COMPLETED and replay.record.body == DONE.body
        assert replay.record.headers == DONE.headers
        dup = await claim(store, live_scope, live_key)
        assert dup.outcome is ClaimOutcome.EXISTING
        assert dup.record.lock_token == live["lock_token"]
        assert await store.complete(scope=live_scope, key=live_key,
                                    token=live["lock_token"], done=DONE, notify=False)
        assert (await claim(store, *ids())).outcome is ClaimOutcome.NEW
    finally:
        await store.close()


async def old_claim(store: PostgresStore, scope: str, key: str) -> asyncpg.Record:
    """A claim as the previous versions send it (idemproxy_claim, kept beside 0009's
    idemproxy_claim2 for replicas still running them), on the store's own session."""
    async with store.connection() as conn:
        row: asyncpg.Record = await conn.fetchrow(
            "SELECT * FROM idemproxy_claim($1, $2, $3, $4, $5, $6)", scope, key, b"\x01" * 32,
            uuid.uuid4(), 30.0, 3600.0)
    return row
