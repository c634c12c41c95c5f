"""The replay cache (proxy/flow/cache.py): a hot retry answered without a database round trip,
never after the key expired or was deleted, and never while deletions could be missed."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
import asyncpg

from proxy.flow.cache import EXPIRY_MARGIN, MAX_ENTRY, ReplayCache, entry_cost
from proxy.store import Record, State
from proxy.store.notify import LISTENER_NAME
from proxy.store.postgres import notify_channel_id
from tests.conftest import ProxyHandle
from tests.test_admin import scope_for
from tests.test_flow import new_key, post
from tests.upstream import TestUpstream, body_json

# --- the cache itself (pure logic) ------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(body: bytes = b"{}", *, ttl: float = 3600, chunks: int = 0) -> Record:
    return Record(State.COMPLETED, b"fp", uuid.uuid4(), NOW + timedelta(seconds=ttl), 201,
                  (("Content-Type", "application/json"),), None if chunks else body, chunks,
                  len(body), False)


def cost(key: str, rec: Record, scope: str = "s") -> int:
    return entry_cost(scope, key, rec.body or b"", rec.headers)


def live_cache(max_bytes: int = 1 << 20) -> ReplayCache:
    c = ReplayCache(max_bytes)
    c.set_live(True)
    return c


def test_off_until_live_and_emptied_when_deaf():
    """The cache keeps nothing until NOTIFY is live and drops everything when it stops being so."""
    c = ReplayCache(1 << 20)
    c.put("s", "k", record(), seen=c.version)
    assert c.get("s", "k", db_now=NOW.timestamp()) is None  # not live yet: nothing kept
    c.set_live(True)
    c.put("s", "k", record(), seen=c.version)
    assert c.get("s", "k", db_now=NOW.timestamp()) is not None
    c.set_live(False)
    assert len(c) == 0 and c.get("s", "k", db_now=NOW.timestamp()) is None


def test_zero_bytes_turns_it_off():
    """A cache of zero bytes never goes live and never holds an entry."""
    c = live_cache(0)
    c.put("s", "k", record(), seen=c.version)
    assert not c.live and len(c) == 0


def test_stops_serving_a_margin_before_the_database_expiry():
    """An entry is served until EXPIRY_MARGIN before its database expiry, then evicted."""
    c = live_cache()
    c.put("s", "k", record(ttl=10), seen=c.version)
    expiry = NOW.timestamp() + 10
    assert c.get("s", "k", db_now=expiry - EXPIRY_MARGIN - 0.01) is not None
    assert c.get("s", "k", db_now=expiry - EXPIRY_MARGIN) is None
    assert len(c) == 0


def test_bounded_by_bytes_least_recently_used_first():
    """Over its byte budget the cache evicts the least recently used entry (a read is a use)."""
    body = b"x" * 1000
    c = live_cache(3 * cost("a", record(body)) + 100)  # room for three entries
    for k in "abc":
        c.put("s", k, record(body), seen=c.version)
    assert c.get("s", "a", db_now=NOW.timestamp()) is not None  # a is now the most recent
    c.put("s", "d", record(body), seen=c.version)
    held = {k for k in "abcd" if c.get("s", k, db_now=NOW.timestamp()) is not None}
    assert held == {"a", "c", "d"} and c.size_bytes <= c.max_bytes


def test_large_and_chunked_bodies_are_not_kept():
    """Bodies over MAX_ENTRY bytes and bodies stored in chunks are never cached."""
    c = live_cache(1 << 24)
    c.put("s", "big", record(b"x" * (MAX_ENTRY + 1)), seen=c.version)
    c.put("s", "chunked", record(b"x" * 10, chunks=2), seen=c.version)
    assert len(c) == 0


def test_a_deletion_heard_between_read_and_put_keeps_the_record_out():
    """A NOTIFY can overtake the database answer it invalidates: the put is refused."""
    c = live_cache()
    seen = c.version  # the claim is sent
    c.forget_id(notify_channel_id("s", "k"))  # the delete's NOTIFY lands first
    c.put("s", "k", record(), seen=seen)  # then the answer read before the delete
    assert c.get("s", "k", db_now=NOW.timestamp()) is None
    c.put("s", "k", record(), seen=c.version)
    assert c.get("s", "k", db_now=NOW.timestamp()) is not None


def test_forget_by_the_notify_payload():
    """A NOTIFY payload's channel id evicts exactly its own key, not others in the same scope."""
    c = live_cache()
    c.put("route:tenant", "k1", record(), seen=c.version)
    c.put("route:tenant", "k2", record(), seen=c.version)
    c.forget_id(notify_channel_id("route:tenant", "k1"))
    assert c.get("route:tenant", "k1", db_now=NOW.timestamp()) is None
    assert c.get("route:tenant", "k2", db_now=NOW.timestamp()) is not None


def test_forget_by_payload_finds_entries_put_before_and_after_an_earlier_forget():
    """Entries are named by their md5 lazily: whether put before an earlier forget, after
    it, put again, or evicted meanwhile, each payload drops its own key and only it."""
    room = 4 * cost("e0", record())
    c = live_cache(max_bytes=room)
    c.put("s", "old", record(), seen=c.version)
    c.put("s", "gone", record(), seen=c.version)
    c.forget_id(notify_channel_id("s", "gone"))  # names "old" too
    c.put("s", "new", record(), seen=c.version)
    c.put("s", "old", record(b"[]"), seen=c.version)  # put again after it was named
    c.forget_id(notify_channel_id("s", "new"))
    now = NOW.timestamp()
    assert c.get("s", "new", db_now=now) is None
    assert c.get("s", "old", db_now=now) is not None
    c.forget_id(notify_channel_id("s", "old"))
    assert c.get("s", "old", db_now=now) is None
    for i in range(10):  # evictions of named and unnamed entries alike
        c.put("s", f"e{i}", record(), seen=c.version)
        if i == 5:
            c.forget_id(notify_channel_id("s", "nothing"))
    assert len(c) == 4 and c.size_bytes <= room
    c.forget_id(notify_channel_id("s", "e9"))
    assert len(c) == 3 and c.get("s", "e8", db_now=now) is not None


# --- through the proxy, on real PostgreSQL ----------------------------------------------

def claims(p: ProxyHandle) -> float:
    return p.metric("idemproxy_store_seconds_count", op="claim")


async def test_a_cached_replay_is_the_stored_answer_without_a_round_trip(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """A hot retry replays the original status, body and headers from memory, with no store call."""
    p = await make_proxy()
    key = new_key()
    s1, h1, b1 = await post(client, p.url + "/exec/c1", key=key)
    before = claims(p)
    s2, h2, b2 = await post(client, p.url + "/exec/c1", key=key)
    assert claims(p) == before  # answered from memory
    assert p.metric("idemproxy_replay_cache_hits_total") == 1
    assert (s1, b1) == (s2, b2) and h2["Idempotent-Replayed"] == "true"
    assert h2["Idempotency-Expires"] == h1["Idempotency-Expires"]
    assert h2["Content-Type"] == h1["Content-Type"]
    assert upstream.count("/exec/c1") == 1


async def test_a_replay_found_in_the_database_is_cached_for_the_next(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """Proxy B never saw the first request: its first replay reads the database, the
    second does not."""
    a, b = await make_proxy(), await make_proxy()
    key = new_key()
    await post(client, a.url + "/exec/c2", key=key)
    n0 = claims(b)
    await post(client, b.url + "/exec/c2", key=key)
    n1 = claims(b)
    _, h, body = await post(client, b.url + "/exec/c2", key=key)
    assert (n1 - n0, claims(b) - n1) == (1, 0)
    assert h["Idempotent-Replayed"] == "true" and body_json(body)["n"] == 1


async def test_a_different_payload_is_still_refused_from_the_cache(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """A cached key reused with another body still gets a 422 problem+json, upstream untouched."""
    p = await make_proxy()
    key = new_key()
    await post(client, p.url + "/exec/c3", key=key)
    s, h, _ = await post(client, p.url + "/exec/c3", key=key, data=b'{"amount": 999}')
    assert s == 422 and h["Content-Type"] == "application/problem+json"
    assert p.metric("idemproxy_requests_total", route="exec", outcome="mismatch") == 1
    assert upstream.count("/exec/c3") == 1


async def test_large_answers_replay_from_the_database(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """An answer over MAX_ENTRY bytes is not cached: its replay reads the database again."""
    p = await make_proxy()
    key = new_key()
    url = p.url + f"/big?size={MAX_ENTRY + 1}&length=1"
    await post(client, url, key=key)
    before = claims(p)
    _, h, body = await post(client, url, key=key)
    assert claims(p) == before + 1 and len(body) == MAX_ENTRY + 1
    assert h["Idempotent-Replayed"] == "true"


async def test_cached_replays_stop_when_the_key_expires(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """Once the key's ttl has passed, no cached replay is served: the request executes again."""
    p = await make_proxy("""
        - name: short
          match: {methods: [POST], path: "/exec/*"}
          ttl: 3s
          lock_timeout: 3s
    """)
    key = new_key()
    await post(client, p.url + "/exec/c4", key=key)
    _, h, _ = await post(client, p.url + "/exec/c4", key=key)
    assert h["Idempotent-Replayed"] == "true"
    assert p.metric("idemproxy_replay_cache_hits_total") == 1
    await asyncio.sleep(3.2)
    _, h, body = await post(client, p.url + "/exec/c4", key=key)
    assert "Idempotent-Replayed" not in h and body_json(body)["n"] == 2


async def test_a_deleted_key_executes_again_on_every_replica(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession):
    """Deleted through replica A's admin API, the key is dropped from replica B's cache by
    NOTIFY: B's next request for it executes again, exactly once."""
    a, b = await make_proxy(), await make_proxy()
    key = new_key()
    await post(client, a.url + "/exec/c5", key=key)
    await post(client, b.url + "/exec/c5", key=key)  # B caches the record
    async with client.delete(a.admin_url + "/admin/keys",
                             params={"scope": scope_for(a, "exec"), "key": key}) as r:
        assert r.status == 200
    async with asyncio.timeout(5):
        while True:  # replays from B's cache until the NOTIFY lands (milliseconds)
            _, h, body = await post(client, b.url + "/exec/c5", key=key)
            if "Idempotent-Replayed" not in h:
                break
            await asyncio.sleep(0.01)
    assert body_json(body)["n"] == 2 and upstream.count("/exec/c5") == 2
    _, h, _ = await post(client, a.url + "/exec/c5", key=key)
    assert h["Idempotent-Replayed"] == "true" and upstream.count("/exec/c5") == 2


async def test_the_cache_is_emptied_when_the_listen_connection_drops(
        make_proxy, upstream: TestUpstream, client: aiohttp.ClientSession, db: str):
    """A deletion could be missed while the LISTEN connection is down, so everything the
    cache held is dropped: the next replay reads the database again."""
    p = await make_proxy()
    key = new_key()
    await post(client, p.url + "/exec/c6", key=key)
    before = claims(p)
    await post(client, p.url + "/exec/c6", key=key)
    assert claims(p) == before  # cached
    notifier = p.deps.notifier
    assert notifier is not None
    conn = await asyncpg.connect(db)
    try:
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1", LISTENER_NAME)
    finally:
        await conn.close()
    assert killed >= 1
    async with asyncio.timeout(5):
        while notifier.connected.is_set():
            await asyncio.sleep(0.01)
        await notifier.connected.wait()
    _, h, _ = await post(client, p.url + "/exec/c6", key=key)
    assert h["Idempotent-Replayed"] == "true" and claims(p) == before + 1
    await post(client, p.url + "/exec/c6", key=key)
    assert claims(p) == before + 1  # cached again now that deletions are heard
    assert upstream.count("/exec/c6") == 1


def test_a_full_cache_gives_the_garbage_collector_nothing_to_walk():
    """Entries are tuples of plain values, which the collector stops tracking: a full
    cache must not lengthen every full collection (Record objects made them 6x longer)."""
    import gc
    c = live_cache(1 << 24)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2000):
        c.put("s", f"k{i}", record(), seen=c.version)
    gc.collect()
    assert len(gc.get_objects()) - before < 50
    assert c.get("s", "k1", db_now=NOW.timestamp()) is not None
