"""Operations on data at rest (issue #15) against real PostgreSQL: key usage,
re-encryption under the primary key, and erasure of exactly one tenant's records."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from proxy import keyops
from proxy.sealing import parse_keys
from proxy.store.atrest import erase_tenant, key_usage, reencrypt_batch
from tests.test_at_rest import K1, K2, ROUTES
from tests.test_flow import post


@pytest.fixture
def db(layout_db: str) -> str:
    """This module's tests run on one node and on a Citus cluster (issue #29)."""
    return layout_db


def new_key() -> str:
    return uuid.uuid4().hex


async def test_reencrypt_moves_old_records_to_the_primary_key(make_proxy, upstream, client,
                                                              db):
    """After rotation, reencrypt re-seals k1's records (inline and chunked) under k2; they
    replay byte for byte; usage still shows k1 keying their fingerprints (which cannot
    be re-keyed), so removing k1 now is the defined error."""
    old = await make_proxy(ROUTES, encryption_keys=K1)
    small, big = new_key(), new_key()
    _, _, b_small = await post(client, old.url + "/exec/re", key=small)
    _, _, b_big = await post(client, old.url + "/big?size=700000", key=big, data=b"")
    new = await make_proxy(ROUTES, encryption_keys=f"{K2},{K1}")
    after: tuple[str, str] | None = ("", "")
    while after is not None:
        _, after = await reencrypt_batch(new.deps.store, after=after, batch=50)
    usage = {u.key_id: u for u in await key_usage(new.deps.store)}
    assert usage["k1"].fingerprints >= 2  # (altered records of other tests stay sealed)
    s1, h1, r_small = await post(client, new.url + "/exec/re", key=small)
    s2, h2, r_big = await post(client, new.url + "/big?size=700000", key=big, data=b"")
    assert (r_small, r_big) == (b_small, b_big)
    assert h1["Idempotent-Replayed"] == h2["Idempotent-Replayed"] == "true"
    conn = await asyncpg.connect(db)
    try:
        heads = await conn.fetch("SELECT headers FROM idemproxy_keys WHERE key = ANY($1)",
                                 [small, big])
        chunks = await conn.fetch("SELECT data FROM idemproxy_chunks WHERE key = $1", big)
    finally:
        await conn.close()
    assert all(bytes(r["headers"])[:5] == b"\x00\x01\x02k2" for r in heads)
    assert chunks and all(bytes(r["data"])[:5] == b"\x00\x01\x02k2" for r in chunks)
    only_k2 = await make_proxy(ROUTES, encryption_keys=K2)
    status, _, body = await post(client, only_k2.url + "/exec/re", key=small)
    assert status == 500 and b"stored-answer-unreadable" in body
    assert upstream.count("/exec/re") == 1 and upstream.count("/big") == 1


async def test_erasure_removes_exactly_that_tenants_records(make_proxy, upstream, client):
    """keys purge by tenant deletes every record of that tenant and none of another's;
    the erased tenant's next request executes again, the other's still replays."""
    p = await make_proxy(ROUTES, encryption_keys=K1)
    alice, bob = {"Authorization": "Bearer alice-" + new_key()}, \
        {"Authorization": "Bearer bob-" + new_key()}
    ka, kb = new_key(), new_key()
    for k in (ka, kb):
        await post(client, p.url + "/exec/erase-a", key=k, headers=alice)
    await post(client, p.url + "/exec/erase-b", key=ka, headers=bob)
    sealer = p.deps.store.sealer
    tenant = keyops.tenant_hash_of(p.config, sealer, alice["Authorization"],
                                   header="Authorization")
    assert (await erase_tenant(p.deps.store, tenant)).deleted == 2
    assert (await erase_tenant(p.deps.store, tenant)).deleted == 0
    p.deps.cache.clear()
    s, h, _ = await post(client, p.url + "/exec/erase-b", key=ka, headers=bob)
    assert h.get("Idempotent-Replayed") == "true"
    s, h, _ = await post(client, p.url + "/exec/erase-a", key=ka, headers=alice)
    assert "Idempotent-Replayed" not in h and upstream.count("/exec/erase-a") == 3


async def test_admin_erases_a_tenant_and_validates_the_hash(make_proxy, upstream, client):
    """DELETE /admin/tenants/{hash} answers the count deleted; a malformed hash is a 400
    problem."""
    p = await make_proxy(ROUTES)
    cred = "Bearer carol-" + new_key()
    await post(client, p.url + "/exec/adm-erase", key=new_key(), headers={
        "Authorization": cred})
    tenant = keyops.tenant_hash_of(p.config, p.deps.store.sealer, cred,
                                   header="Authorization")
    async with client.delete(p.admin_url + f"/admin/tenants/{tenant}") as r:
        assert r.status == 200 and (await r.json()) == {"deleted": 1, "in_flight": 0}
    async with client.delete(p.admin_url + "/admin/tenants/not-a-hash") as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/problem+json")


def test_generated_key_lines_parse(capsys):
    """`encryption-keys generate ID` prints one ID:BASE64 line the key list accepts."""
    import argparse
    keyops.generate(argparse.Namespace(key_id="k9"))
    line = capsys.readouterr().out.strip()
    assert [k.id for k in parse_keys(line, source="test")] == ["k9"]


async def test_cli_tenant_hash_usage_and_purge(db, store, make_proxy, client):
    """`idemproxy tenant-hash` prints the proxy's own hash for a credential; `keys usage`
    lists the keys in use; `keys purge --tenant-of` erases that tenant's records."""
    from tests.test_cli import cli, keys_cmd

    p = await make_proxy(ROUTES, encryption_keys=K1)
    cred = "Bearer dave-" + new_key()
    await post(client, p.url + "/exec/cli-erase", key=new_key(), headers={
        "Authorization": cred})
    code, out, err = await cli("tenant-hash", cred, "--config", "config/example.yaml", db=db)
    assert code == 0, err
    assert out.strip() == keyops.tenant_hash_of(p.config, p.deps.store.sealer, cred,
                                                header="Authorization")
    env = {"IDEMPROXY_ENCRYPTION_KEYS": K1}
    code, out, err = await cli(*keys_cmd("usage"), db=db, env=env)
    assert code == 0 and '"key_id": "k1"' in out, err
    code, out, err = await cli(*keys_cmd("purge", "--tenant-of", cred), db=db, env=env)
    assert code == 0 and out.startswith("deleted 1 records"), err
