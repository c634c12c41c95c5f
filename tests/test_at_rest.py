"""Stored answers sealed at rest (issue #15), over real sockets against real PostgreSQL:
nothing readable in the tables, byte-exact replays, rotation, and records that cannot be
opened answered as errors, never executed twice."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import uuid

import aiohttp
import asyncpg

from proxy import keys
from tests.conftest import ProxyHandle
from tests.test_flow import post
from tests.upstream import pattern

K1 = "k1:" + base64.b64encode(b"\x11" * 32).decode()
K2 = "k2:" + base64.b64encode(b"\x22" * 32).decode()

ROUTES = """
- name: mail
  match: {methods: [POST], path: "/exec/mail"}
  key: {body: [/to]}
- name: exec
  match: {methods: [POST, PUT], path: "/exec/*"}
- name: echo
  match: {methods: [POST], path: "/echo*"}
- name: big
  match: {methods: [POST], path: "/big"}
  max_stored_body: 200MiB
"""


def new_key() -> str:
    return uuid.uuid4().hex


async def table_rows_text(db: str, *, key: str | None = None) -> str:
    """Every row of every idemproxy table, as Postgres prints it (bytea as hex); only
    the rows of `key` where a table has a key column (other tests share the database)."""
    conn = await asyncpg.connect(db)
    try:
        tables = await conn.fetch(
            "SELECT tablename, EXISTS (SELECT 1 FROM information_schema.columns c WHERE "
            "c.table_name = t.tablename AND c.column_name = 'key') AS keyed "
            "FROM pg_tables t WHERE tablename LIKE 'idemproxy%'")
        parts = []
        for t in tables:
            if key is not None and t["keyed"]:
                rows = await conn.fetch(f"SELECT t::text AS r FROM {t['tablename']} t "
                                        "WHERE t.key = $1", key)
            else:
                rows = await conn.fetch(f"SELECT t::text AS r FROM {t['tablename']} t")
            parts += [r["r"] for r in rows]
        return "\n".join(parts)
    finally:
        await conn.close()


def assert_absent(dump: str, marker: bytes) -> None:
    assert marker.decode() not in dump
    assert marker.hex() not in dump


async def test_marker_is_in_no_column_and_replays_are_exact(make_proxy, upstream, client, db):
    """With keys set, a marker sent in request and answer headers and bodies (inline and
    chunked) appears in no column of any idemproxy table; replays are byte for byte."""
    p = await make_proxy(ROUTES, encryption_keys=K1)
    marker = b"MARKER-" + uuid.uuid4().hex.encode()
    small_key, big_key = new_key(), new_key()
    hdrs = {"X-Secret": marker.decode(), "Authorization": "Bearer " + marker.decode()}
    first = await post(client, p.url + "/echo", key=small_key, data=b"card=" + marker,
                       headers=hdrs)
    again = await post(client, p.url + "/echo", key=small_key, data=b"card=" + marker,
                       headers=hdrs)
    assert first[0] == again[0] == 200 and marker in first[2]
    assert again[2] == first[2] and again[1]["Idempotent-Replayed"] == "true"
    # a chunked body: the marker in every chunk
    size = 600 * 1024
    async with client.post(p.url + f"/big?size={size}", headers={
            "Idempotency-Key": big_key, "X-Secret": marker.decode()}) as r:
        big1 = await r.read()
    async with client.post(p.url + f"/big?size={size}",
                           headers={"Idempotency-Key": big_key}) as r:
        big2 = await r.read()
        assert r.headers["Idempotent-Replayed"] == "true"
    assert big1 == big2 == pattern(size)
    dump = await table_rows_text(db)
    assert_absent(dump, marker)
    # the big body's bytes, in this record's rows (other tests store the same pattern)
    assert pattern(4096, 300 * 1024).hex() not in await table_rows_text(db, key=big_key)
    assert upstream.count("/echo") == 1 and upstream.count("/big") == 1


async def test_a_body_derived_key_cannot_be_checked_against_a_guessed_body(
        make_proxy, upstream, client, db):
    """A content-derived key is stored as an HMAC under the installation secret: the
    plain SHA-256 of the guessed value (what the key was before) is in no column, and
    the key still dedupes a retry."""
    p = await make_proxy(ROUTES)
    to = f"{uuid.uuid4().hex}@example.com"
    body = json.dumps({"to": to}).encode()
    hdrs = {"Content-Type": "application/json"}
    first = await post(client, p.url + "/exec/mail", key=None, data=body, headers=hdrs)
    again = await post(client, p.url + "/exec/mail", key=None, data=body, headers=hdrs)
    assert first[0] == again[0] == 201 and again[1]["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/mail") == 1
    guess = hashlib.sha256(f"json:{keys.canonical_json([to])}".encode()).hexdigest()
    dump = await table_rows_text(db)
    assert "body:" in dump and guess not in dump


async def sealed_rows(db: str, key: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db)
    try:
        return await conn.fetch("SELECT k.headers, k.body, k.fingerprint, "
                                "(SELECT count(*) FROM idemproxy_chunks c WHERE c.key = k.key)"
                                " AS chunks FROM idemproxy_keys k WHERE k.key = $1", key)
    finally:
        await conn.close()


async def test_rotation_old_records_replay_new_ones_use_the_new_key(make_proxy, upstream,
                                                                    client, db):
    """After k2 is put before k1, records sealed by k1 still replay (fingerprints still
    match) and new records are sealed with k2."""
    old = await make_proxy(ROUTES, encryption_keys=K1)
    key = new_key()
    s1, _, b1 = await post(client, old.url + "/exec/rot", key=key)
    new = await make_proxy(ROUTES, encryption_keys=f"{K2},{K1}")
    s2, h2, b2 = await post(client, new.url + "/exec/rot", key=key)
    assert (s1, s2) == (201, 201) and b2 == b1 and h2["Idempotent-Replayed"] == "true"
    other = new_key()
    await post(client, new.url + "/exec/new", key=other)
    [row] = await sealed_rows(db, other)
    assert row["headers"][:5] == b"\x00\x01\x02k2"
    assert upstream.count("/exec/rot") == 1


async def unreadable_retry(p: ProxyHandle, client: aiohttp.ClientSession, url: str,
                           key: str, caplog) -> None:
    status, headers, body = await post(client, url, key=key)
    assert status == 500, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert b"stored-answer-unreadable" in body and b"not executed again" in body
    assert any("cannot be opened" in r.getMessage() for r in caplog.records)


async def test_a_removed_key_is_an_error_never_a_second_execution(make_proxy, upstream,
                                                                  client, caplog):
    """A record sealed by a key no longer listed gets a 500 problem, counted and logged
    with the key id; the upstream is not called again."""
    old = await make_proxy(ROUTES, encryption_keys=K1)
    key = new_key()
    await post(client, old.url + "/exec/gone", key=key)
    p = await make_proxy(ROUTES, encryption_keys=K2)
    await unreadable_retry(p, client, p.url + "/exec/gone", key, caplog)
    assert p.metric("idemproxy_records_unreadable_total", key_id="k1") >= 1
    assert upstream.count("/exec/gone") == 1
    none = await make_proxy(ROUTES)  # no keys at all: still an error
    status, _, _ = await post(client, none.url + "/exec/gone", key=key)
    assert status == 500 and upstream.count("/exec/gone") == 1


async def flip(db: str, sql: str, key: str) -> None:
    conn = await asyncpg.connect(db)
    try:
        assert await conn.execute(sql, key) in ("UPDATE 1",)
    finally:
        await conn.close()


async def test_a_flipped_ciphertext_byte_is_an_error_never_a_second_execution(
        make_proxy, upstream, client, db, caplog):
    """A flipped byte in a sealed body or in its headers gets the defined error; the
    upstream is not called again."""
    p = await make_proxy(ROUTES, encryption_keys=K1)
    p.deps.cache.set_live(False)  # the replay cache would answer without the database
    for column in ("body", "headers"):
        key = new_key()
        await post(client, p.url + "/exec/flip-" + column, key=key)
        await flip(db, f"UPDATE idemproxy_keys SET {column} = set_byte({column}, "
                   f"length({column}) - 1, get_byte({column}, length({column}) - 1) # 1) "
                   "WHERE key = $1", key)
        await unreadable_retry(p, client, p.url + "/exec/flip-" + column, key, caplog)
        assert upstream.count("/exec/flip-" + column) == 1


async def test_a_flipped_chunk_cuts_the_replay_never_a_second_execution(
        make_proxy, upstream, client, db):
    """A flipped byte in a later body chunk cuts the streamed replay (its headers are out)
    and is counted; the upstream is not called again and no altered byte is sent."""
    p = await make_proxy(ROUTES, encryption_keys=K1)
    key, size = new_key(), 1024 * 1024
    await post(client, p.url + f"/big?size={size}", key=key, data=b"")
    await flip(db, "UPDATE idemproxy_chunks SET data = set_byte(data, 100, "
               "get_byte(data, 100) # 1) WHERE key = $1 AND seq = 2", key)
    got = b""
    try:
        async with client.post(p.url + f"/big?size={size}",
                               headers={"Idempotency-Key": key}) as r:
            async for part in r.content.iter_chunked(65536):
                got += part
    except aiohttp.ClientPayloadError:
        pass
    assert len(got) < size and got == pattern(len(got))
    assert p.metric("idemproxy_records_unreadable_total", key_id="k1") >= 1
    assert upstream.count("/big") == 1


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def test_a_100_mib_sealed_answer_streams_and_replays_in_bounded_memory(
        make_proxy, upstream, client):
    """A 100 MiB answer is sealed chunk by chunk, streamed and replayed byte for byte,
    with this process (client, proxy and upstream together) growing by under 50 MiB."""
    p = await make_proxy(ROUTES, encryption_keys=K1)
    key, size = new_key(), 100 * 2**20
    base, peak = rss_mib(), 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mib())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        for attempt in range(2):
            async with client.post(p.url + f"/big?size={size}",
                                   headers={"Idempotency-Key": key}) as r:
                seen = 0
                async for part in r.content.iter_chunked(256 * 1024):
                    assert part == pattern(len(part), seen)
                    seen += len(part)
                assert seen == size
                assert (r.headers.get("Idempotent-Replayed") == "true") == (attempt == 1)
    finally:
        sampler.cancel()
    assert peak - base < 50, f"RSS grew {peak - base:.1f} MiB"
    assert upstream.count("/big") == 1
