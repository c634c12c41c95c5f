"""A sweep pass drains everything due, and removes the chunks no answer points at
(issue 25): it used to stop at 100 batches, and a recording the store failed under left
its chunks until the key expired. Real PostgreSQL; small batches stand for 1000-row ones."""

from __future__ import annotations

import uuid

import asyncpg

from proxy.store import Completion
from proxy.store.postgres import PostgresStore
from proxy.store.sweeper import sweep_once


async def _sql(db: str, query: str, *args: object) -> int:
    conn = await asyncpg.connect(db)
    try:
        n: int = await conn.fetchval(query, *args)
        return n
    finally:
        await conn.close()


async def _expired(db: str, scope: str, n: int) -> None:
    """`n` completed rows of `scope` whose window ended a minute ago."""
    await _sql(db, """
        WITH i AS (INSERT INTO idemproxy_keys (scope, key, fingerprint, state, lock_token,
                                               expires_at, status)
                   SELECT $1, 'k' || g, '\\x00', 2, gen_random_uuid(),
                          now() - interval '1 minute', 200
                     FROM generate_series(1, $2) g RETURNING 1)
        SELECT count(*) FROM i""", scope, n)


async def _keys(db: str, scope: str) -> int:
    return await _sql(db, "SELECT count(*) FROM idemproxy_keys WHERE scope = $1", scope)


async def _chunks(db: str, scope: str, key: str | None = None) -> int:
    return await _sql(db, "SELECT count(*) FROM idemproxy_chunks WHERE scope = $1 "
                      "AND ($2::text IS NULL OR key = $2)", scope, key)


async def test_one_pass_removes_more_than_a_hundred_batches(db: str, store: PostgresStore):
    """250 expired rows with batches of 2: one pass deletes them all (the old cap of 100
    batches per pass left 50), and a second pass finds nothing of them left."""
    scope = f"drain:{uuid.uuid4().hex[:8]}"
    await _expired(db, scope, 250)
    assert await sweep_once(store, batch=2) >= 250
    assert await _keys(db, scope) == 0


async def test_one_pass_removes_every_orphaned_chunk(db: str, store: PostgresStore):
    """Chunks of 25 tokens no record holds go in one pass of 10-chunk batches (the old
    pass removed one batch of orphans)."""
    scope = f"orph:{uuid.uuid4().hex[:8]}"
    await _sql(db, """
        WITH i AS (INSERT INTO idemproxy_chunks (scope, key, lock_token, seq, data)
                   SELECT $1, 'k' || g, gen_random_uuid(), 0, '\\x01'
                     FROM generate_series(1, 25) g RETURNING 1)
        SELECT count(*) FROM i""", scope)
    await sweep_once(store, batch=10)
    assert await _chunks(db, scope) == 0


async def _recorded(store: PostgresStore, scope: str, key: str, *, chunks: int,
                    complete_with: int | None) -> None:
    """A claim that wrote `chunks` chunks, then completed referencing `complete_with` of
    them (0: the body omitted, as when the store failed mid-recording), or is in flight."""
    token = uuid.uuid4()
    await store.claim(scope=scope, key=key, fingerprint=b"f" * 32, token=token, lease=60,
                      ttl=3600)
    for seq in range(chunks):
        await store.write_chunk(scope=scope, key=key, token=token, seq=seq, data=b"x" * 10)
    if complete_with is not None:
        done = Completion(200, (), None, complete_with, 10 * chunks, complete_with == 0)
        assert await store.complete(scope=scope, key=key, token=token, done=done,
                                    notify=False)


async def test_chunks_no_stored_answer_points_at_are_removed(db: str,
                                                             store: PostgresStore):
    """A key completed as omitted after its chunks were written (the store failed
    mid-recording) loses them at the next pass; the chunks of a body that was stored, and
    of a recording still in flight, stay."""
    scope = f"omit:{uuid.uuid4().hex[:8]}"
    await _recorded(store, scope, "omitted", chunks=3, complete_with=0)
    await _recorded(store, scope, "stored", chunks=3, complete_with=3)
    await _recorded(store, scope, "recording", chunks=2, complete_with=None)
    await sweep_once(store, batch=2)
    assert await _chunks(db, scope, "omitted") == 0
    assert await _chunks(db, scope, "stored") == 3
    assert await _chunks(db, scope, "recording") == 2
