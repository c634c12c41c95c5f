"""The upstream key closes the ambiguous window for an upstream that dedupes on it: a
takeover after kill -9, or after an unknown outcome, re-sends the same key, and a
Stripe-style upstream that remembers keys applies the effect exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import serve_app
from tests.procs import Cluster
from tests.test_flow import post

ROUTES = """
- name: charges
  match: {methods: [POST], path: "/v1/charges"}
  require_key: true
  lock_timeout: 1500ms
  upstream_key: {header: Idempotency-Key}
"""


class IdempotentUpstream:
    """A payment API in the Stripe style: it records each Idempotency-Key with its result
    in the same step as the effect, and answers a known key with the stored result.

    `?then=stall` / `?then=reset`: after applying the effect for a new key, never answer
    / drop the connection unanswered (the outcome the proxy sees is unknown).
    """

    def __init__(self) -> None:
        self.url = ""
        self.effects: list[str] = []  # charge ids, one per effect applied
        self.results: dict[str, bytes] = {}
        self.keys_seen: list[str] = []

    async def charge(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key", "")
        self.keys_seen.append(key)
        await request.read()
        if key in self.results:  # the outbox-style table: a re-send is a no-op
            return web.Response(status=201, body=self.results[key],
                                content_type="application/json")
        charge = f"ch_{len(self.effects) + 1}"
        self.effects.append(charge)
        self.results[key] = json.dumps({"id": charge}).encode()
        then = request.query.get("then")
        if then == "stall":
            await asyncio.sleep(3600)
        if then == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.1)
            raise asyncio.CancelledError
        return web.Response(status=201, body=self.results[key],
                            content_type="application/json")


@pytest.fixture
async def provider() -> AsyncIterator[IdempotentUpstream]:
    up = IdempotentUpstream()
    app = web.Application()
    app.router.add_post("/v1/charges", up.charge)
    async with serve_app(app) as up.url:
        yield up


async def test_unknown_outcome_then_takeover_leaves_one_effect(make_proxy, provider, client):
    """The upstream charged, then the connection reset: 502, outcome unknown. After the
    lease the retry takes over and re-sends the same upstream key; the provider answers
    from its table: one charge, and the client gets that charge's answer."""
    p = await make_proxy(ROUTES, upstream_url=provider.url)
    key = uuid.uuid4().hex
    url = p.url + "/v1/charges?then=reset"
    s1, _, _ = await post(client, url, key=key)
    assert s1 == 502
    assert (await post(client, url, key=key))[0] == 409  # lease still running
    await asyncio.sleep(1.7)
    s2, _, body = await post(client, url, key=key)
    assert s2 == 201 and json.loads(body) == {"id": "ch_1"}
    s3, h3, body3 = await post(client, url, key=key)
    assert (s3, body3, h3["Idempotent-Replayed"]) == (201, body, "true")
    assert provider.effects == ["ch_1"]
    assert len(provider.keys_seen) == 2 and len(set(provider.keys_seen)) == 1
    assert provider.keys_seen[0] != key
    assert p.metric("idemproxy_claims_taken_over_total", route="charges") == 1


@pytest.mark.slow
async def test_kill_9_then_takeover_resends_the_same_key_and_one_effect(
        db: str, tmp_path: Path, provider: IdempotentUpstream):
    """Proxy A is killed (-9) while the provider holds the charge; proxy B, having seen
    the claim, takes it over a lease later and sends the same upstream key: one charge.
    Another tenant's same client key sends another upstream key (its own charge)."""
    cluster = Cluster(tmp_path, db)
    try:
        a = await cluster.start(ROUTES, upstream=provider.url)
        b = await cluster.start(ROUTES, upstream=provider.url)
        key = uuid.uuid4().hex
        tenant_a = aiohttp.ClientSession(headers={"Authorization": "Bearer sk_tenant_a"})
        tenant_b = aiohttp.ClientSession(headers={"Authorization": "Bearer sk_tenant_b"})
        async with tenant_a, tenant_b:
            first = asyncio.create_task(
                post(tenant_a, a.url + "/v1/charges?then=stall", key=key))
            while not provider.effects:
                await asyncio.sleep(0.01)
            a.signal(signal.SIGKILL)
            with pytest.raises(aiohttp.ClientError):
                await first
            s, _, _ = await post(tenant_a, b.url + "/v1/charges?then=stall", key=key)
            assert s == 409  # B sees the claim in flight (a takeover needs that sighting)
            await asyncio.sleep(1.7)  # its lease ends, its heartbeat unchanged all along
            s, _, body = await post(tenant_a, b.url + "/v1/charges?then=stall", key=key)
            assert s == 201 and json.loads(body) == {"id": "ch_1"}
            s, _, body = await post(tenant_b, b.url + "/v1/charges", key=key)
            assert s == 201 and json.loads(body) == {"id": "ch_2"}
        first_key, retry_key, other_tenant_key = provider.keys_seen
        assert first_key == retry_key != other_tenant_key
        assert provider.effects == ["ch_1", "ch_2"]
        for sent in provider.keys_seen:
            assert key not in sent and "sk_tenant" not in sent
        assert "taken over" in b.output()
    finally:
        cluster.stop_all()
