"""Tenant erasure never deletes an in-flight claim (issue #25, item 8): the tenant's
retry during or after the flight does not execute the request a second time. Real
sockets, real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from proxy import keyops
from proxy.store import Completion
from proxy.store.atrest import erase_tenant
from tests.test_cli import cli, keys_cmd
from tests.test_flow import post

ROUTES = """
- name: gate
  match: {methods: [POST], path: "/gate/*"}
- name: exec
  match: {methods: [POST], path: "/exec/*"}
"""


def new_key() -> str:
    return uuid.uuid4().hex


async def _in_flight(p, client, upstream, path: str, key: str, auth: dict[str, str]
                     ) -> asyncio.Task[tuple[int, dict[str, str], bytes]]:
    """Start a request the upstream holds (the gate), and wait until it executes."""
    first = asyncio.create_task(post(client, p.url + path, key=key, headers=auth))
    async with asyncio.timeout(10):
        while upstream.count(path) < 1:
            await asyncio.sleep(0.02)
    return first


async def test_admin_erasure_leaves_an_in_flight_claim_alone(make_proxy, upstream, client):
    """DELETE /admin/tenants/{hash} during a flight deletes the tenant's completed records,
    reports the claim as in flight, and the retry gets 409 then the replay: one
    execution."""
    p = await make_proxy(ROUTES)
    auth = {"Authorization": "Bearer erin-" + new_key()}
    done_key, key = new_key(), new_key()
    await post(client, p.url + "/exec/erase-done", key=done_key, headers=auth)
    first = await _in_flight(p, client, upstream, "/gate/erase-admin", key, auth)
    tenant = keyops.tenant_hash_of(p.config, p.deps.store.sealer, auth["Authorization"],
                                   header="Authorization")
    async with client.delete(p.admin_url + f"/admin/tenants/{tenant}") as r:
        assert r.status == 200 and await r.json() == {"deleted": 1, "in_flight": 1}
    status, _, _ = await post(client, p.url + "/gate/erase-admin", key=key, headers=auth)
    assert status == 409
    upstream.gate.set()
    s1, _, b1 = await first
    s2, h2, b2 = await post(client, p.url + "/gate/erase-admin", key=key, headers=auth)
    assert (s1, s2, b1) == (201, 201, b2) and h2["Idempotent-Replayed"] == "true"
    assert upstream.count("/gate/erase-admin") == 1
    assert p.metric("idemproxy_records_lost_total", route="gate") == 0
    async with client.delete(p.admin_url + f"/admin/tenants/{tenant}") as r:
        assert await r.json() == {"deleted": 1, "in_flight": 0}  # now it goes


async def test_cli_purge_leaves_an_in_flight_claim_alone(db, make_proxy, upstream, client):
    """`keys purge --tenant` during a flight exits 1 naming the claims it left, and the
    tenant's retry replays the first answer instead of executing again."""
    p = await make_proxy(ROUTES)
    cred = "Bearer frank-" + new_key()
    auth, key = {"Authorization": cred}, new_key()
    first = await _in_flight(p, client, upstream, "/gate/erase-cli", key, auth)
    tenant = keyops.tenant_hash_of(p.config, p.deps.store.sealer, cred,
                                   header="Authorization")
    code, out, err = await cli(*keys_cmd("purge", "--tenant", tenant), db=db)
    assert code == 1 and out.startswith("deleted 0 records"), err
    assert "left 1 in-flight claims" in err
    upstream.gate.set()
    assert (await first)[0] == 201
    status, headers, _ = await post(client, p.url + "/gate/erase-cli", key=key, headers=auth)
    assert status == 201 and headers["Idempotent-Replayed"] == "true"
    assert upstream.count("/gate/erase-cli") == 1


async def test_erasure_keeps_an_in_flight_recordings_chunks(store, db):
    """A recording's chunks written before the erasure survive it: the claim completes
    and its body reads back whole (the erasure's orphan sweep spares live claims)."""
    tenant, key, token = uuid.uuid4().hex, new_key(), uuid.uuid4()
    scope = f"big:{tenant}"
    claim = await store.claim(scope=scope, key=key, fingerprint=b"f" * 32, token=token,
                              lease=60, ttl=3600)
    assert claim.record.lock_token == token
    await store.write_chunk(scope=scope, key=key, token=token, seq=0, data=b"a" * 10)
    await store.write_chunk(scope=scope, key=key, token=token, seq=1, data=b"b" * 10)
    erased = await erase_tenant(store, tenant)
    assert (erased.deleted, erased.in_flight) == (0, 1)
    assert await store.complete(scope=scope, key=key, token=token, notify=False,
                                done=Completion(200, (), None, 2, 20, False))
    body = b"".join([c async for c in store.read_chunks(scope=scope, key=key, token=token)])
    assert body == b"a" * 10 + b"b" * 10
    assert (await erase_tenant(store, tenant)).deleted == 1
    conn = await asyncpg.connect(db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM idemproxy_chunks WHERE key = $1",
                                   key) == 0
    finally:
        await conn.close()
