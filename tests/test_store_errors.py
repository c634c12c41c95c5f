"""No store error becomes a 500 (issue #13). A trigger raises a chosen SQLSTATE when a
key's claim or its completion is written: before the upstream was called the client gets
a 503 problem with Retry-After and nothing is forwarded; after the upstream answered the
client gets the upstream's answer and the completion is retried until it lands, so a
retry after the fault is gone replays it (one execution)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from proxy.errors import StoreFailed, StoreUnavailable
from proxy.store.postgres import PostgresStore
from tests.test_flow import post
from tests.upstream import TestUpstream, body_json

ROUTES = """
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  require_key: true
  lock_timeout: 20s
"""

# Each kind of failure a store call can meet, the SQLSTATE a trigger raises for it, and the
# store error it becomes at the store boundary.
KINDS = {
    "serialization_failure": ("40001", StoreFailed),
    "deadlock_detected": ("40P01", StoreFailed),
    "statement_timeout": ("57014", StoreUnavailable),
    "disk_full": ("53100", StoreUnavailable),
    "read_only_transaction": ("25006", StoreUnavailable),
    "prepared_statement_missing": ("26000", StoreFailed),
    "unique_violation": ("23505", StoreFailed),
    "raise_exception": ("P0001", StoreFailed),
    "internal_error": ("XX000", StoreFailed),
    "admin_shutdown": ("57P01", StoreUnavailable),
}

_SETUP = """
CREATE TABLE IF NOT EXISTS test_store_faults (
    key text PRIMARY KEY, phase text NOT NULL, sqlstate text NOT NULL);
CREATE OR REPLACE FUNCTION test_store_fault() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE f test_store_faults%ROWTYPE;
BEGIN
    SELECT * INTO f FROM test_store_faults WHERE key = NEW.key;
    IF FOUND AND ((f.phase = 'claim' AND NEW.state = 1)
                  OR (f.phase = 'complete' AND NEW.state = 2)) THEN
        RAISE EXCEPTION 'injected fault' USING ERRCODE = f.sqlstate;
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS test_store_fault ON idemproxy_keys;
CREATE TRIGGER test_store_fault BEFORE INSERT OR UPDATE ON idemproxy_keys
    FOR EACH ROW EXECUTE FUNCTION test_store_fault();
"""
_TEARDOWN = """
DROP TRIGGER IF EXISTS test_store_fault ON idemproxy_keys;
DROP FUNCTION IF EXISTS test_store_fault();
DROP TABLE IF EXISTS test_store_faults;
"""


@pytest.fixture
async def faults(db: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to arm and clear faults; the trigger exists only during the test."""
    conn = await asyncpg.connect(db)
    await conn.execute(_SETUP)
    try:
        yield conn
    finally:
        await conn.execute(_TEARDOWN)
        await conn.close()


async def _arm(faults: asyncpg.Connection, key: str, phase: str, sqlstate: str) -> None:
    await faults.execute("INSERT INTO test_store_faults VALUES ($1, $2, $3)",
                         key, phase, sqlstate)


async def _clear(faults: asyncpg.Connection, key: str) -> None:
    await faults.execute("DELETE FROM test_store_faults WHERE key = $1", key)


async def _rows(faults: asyncpg.Connection, key: str) -> int:
    n: int = await faults.fetchval("SELECT count(*) FROM idemproxy_keys WHERE key = $1", key)
    return n


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_store_call_failing_becomes_its_store_error(
        kind: str, faults: asyncpg.Connection, store: PostgresStore):
    """At the store boundary each SQLSTATE becomes StoreUnavailable or StoreFailed (the
    driver's exception as its cause), and the connection it failed on is dropped."""
    sqlstate, expected = KINDS[kind]
    key = f"fault-{uuid.uuid4().hex}"
    await _arm(faults, key, "claim", sqlstate)
    opened = {id(c) for c in store.pool._open}
    with pytest.raises(expected) as info:
        await store.claim(scope="s", key=key, fingerprint=b"f", token=uuid.uuid4(),
                          lease=5, ttl=60)
    assert isinstance(info.value.__cause__, asyncpg.PostgresError)
    assert info.value.__cause__.sqlstate == sqlstate
    assert not opened & {id(c) for c in store.pool._open}  # the failed one is gone
    await _clear(faults, key)
    claim = await store.claim(scope="s", key=key, fingerprint=b"f", token=uuid.uuid4(),
                              lease=5, ttl=60)
    assert claim.record.fingerprint == b"f"


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_failed_claim_is_a_503_and_nothing_is_forwarded(
        kind: str, faults: asyncpg.Connection, make_proxy, upstream: TestUpstream,
        client: aiohttp.ClientSession):
    """The claim fails: 503 problem+json with Retry-After and the SDKs' retry hints, the
    upstream never called, the key as it was (no row); once the fault is gone the retry
    executes, once."""
    p = await make_proxy(ROUTES)
    key = f"fault-{uuid.uuid4().hex}"
    path = f"/exec/{key}"
    await _arm(faults, key, "claim", KINDS[kind][0])
    s, h, body = await post(client, p.url + path, key=key)
    doc = body_json(body)
    assert (s, h["Content-Type"], doc["status"]) == (503, "application/problem+json", 503)
    assert doc["type"].endswith("/store-unavailable") and h["Retry-After"]
    assert h["x-should-retry"] == h["Stripe-Should-Retry"] == "true"
    assert "nothing was stored" not in doc["detail"]
    assert upstream.count(path) == 0 and await _rows(faults, key) == 0
    await _clear(faults, key)
    s2, _, body2 = await post(client, p.url + path, key=key)
    s3, h3, body3 = await post(client, p.url + path, key=key)
    assert (s2, s3, body3, h3["Idempotent-Replayed"]) == (201, 201, body2, "true")
    assert upstream.count(path) == 1


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_failed_completion_answers_the_upstream_and_is_retried(
        kind: str, faults: asyncpg.Connection, make_proxy, upstream: TestUpstream,
        client: aiohttp.ClientSession):
    """The upstream answered but storing it fails: the client gets the upstream's answer
    (no 5xx), a retry meanwhile gets 409 (in flight, never a second execution), and once
    the fault is gone the retried completion lands: the retry replays
    the first answer byte for byte."""
    p = await make_proxy(ROUTES)
    key = f"fault-{uuid.uuid4().hex}"
    path = f"/exec/{key}"
    await _arm(faults, key, "complete", KINDS[kind][0])
    s, _, body = await post(client, p.url + path, key=key)
    assert s == 201 and body_json(body)["n"] == 1
    s_during, _, _ = await post(client, p.url + path, key=key)
    assert s_during == 409
    await _clear(faults, key)
    async with asyncio.timeout(10):
        while True:
            s2, h2, body2 = await post(client, p.url + path, key=key)
            if s2 != 409:
                break
            await asyncio.sleep(0.1)
    assert (s2, body2, h2["Idempotent-Replayed"]) == (201, body, "true")
    assert upstream.count(path) == 1
