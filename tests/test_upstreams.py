"""Several upstreams behind one proxy (`upstreams:` and `routes[].upstream`), and the
stable key sent upstream (`routes[].upstream_key.header`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.upstream.key import derive
from tests.conftest import serve_app
from tests.test_flow import new_key, post
from tests.upstream import TestUpstream


@pytest.fixture
async def second() -> AsyncIterator[TestUpstream]:
    """Another recording upstream (the `upstream` fixture is the default one)."""
    up = TestUpstream()
    async with serve_app(up.app()) as up.url:
        yield up


ROUTES = """
- name: mail
  match: {methods: [POST], path: "/mail/*"}
  upstream: mailer
- name: direct
  match: {methods: [POST], path: "/direct/*"}
  upstream: %s
- name: pay
  match: {methods: [POST], path: "/*"}
"""


async def test_two_upstreams_behind_one_proxy(make_proxy, upstream, second, client):
    """Each route's requests, guarded or not and of any method, reach its own upstream;
    the rest reach the default; Host is the chosen upstream's."""
    p = await make_proxy(ROUTES % second.url,
                         extra=f"upstreams:\n  mailer:\n    url: {second.url}/api\n"
                               "    timeout: 3s\n")
    key = new_key()
    assert (await post(client, p.url + "/mail/send", key=key))[0] == 200
    assert (await post(client, p.url + "/mail/send", key=key))[1]["Idempotent-Replayed"]
    async with client.get(p.url + "/mail/outbox") as resp:  # unguarded: same upstream
        assert resp.status == 200
    assert (await post(client, p.url + "/direct/x", key=new_key()))[0] == 200
    assert (await post(client, p.url + "/exec/pay", key=new_key()))[0] == 201
    async with client.get(p.url + "/elsewhere") as resp:
        assert resp.status == 200
    async with client.get(p.url + "//mail/%6Fut") as resp:  # normalised: /mail/out
        assert resp.status == 200
    assert [(e.method, e.path) for e in second.executions] == [
        ("POST", "/api/mail/send"), ("GET", "/api/mail/outbox"), ("POST", "/direct/x"),
        ("GET", "/api//mail/out")]  # chosen on the normal form, sent as the client wrote it
    assert [(e.method, e.path) for e in upstream.executions] == [
        ("POST", "/exec/pay"), ("GET", "/elsewhere")]
    assert second.executions[0].headers["Host"] == second.url.removeprefix("http://")
    assert p.metric("idemproxy_requests_total", route="mail", outcome="forwarded") == 1


KEYED = """
- name: charges
  match: {methods: [POST], path: "/flaky/*"}
  upstream_key: {header: Idempotency-Key}
- name: by-body
  match: {methods: [POST], path: "/exec/body"}
  key: {body: [/order]}
  upstream_key: {header: X-Upstream-Key}
- name: plain
  match: {methods: [POST], path: "/exec/*"}
"""


async def test_upstream_key_is_stable_across_a_release_retry(make_proxy, upstream, client):
    """A 503 releases the key; the retry sends the same upstream key as the first send,
    and neither is the client's raw key or its credential."""
    p = await make_proxy(KEYED)
    key, auth = new_key(), {"Authorization": "Bearer sk_live_tenant_a"}
    assert (await post(client, p.url + "/flaky/c", key=key, headers=auth))[0] == 503
    assert (await post(client, p.url + "/flaky/c", key=key, headers=auth))[0] == 201
    sent = [e.headers["Idempotency-Key"] for e in upstream.executions]
    assert len(sent) == 2 and sent[0] == sent[1]
    assert key not in sent[0] and "sk_live" not in sent[0] and len(sent[0]) == 64
    assert p.metric("idemproxy_requests_total", route="charges", outcome="released") == 1


async def test_upstream_key_differs_per_tenant(make_proxy, upstream, client):
    """Two tenants with the same client key send different upstream keys."""
    p = await make_proxy(KEYED)
    key = new_key()
    for tenant in ("a", "b"):
        for _ in range(2):  # 503, then 201
            await post(client, p.url + f"/flaky/{tenant}", key=key,
                       headers={"Authorization": f"Bearer {tenant}"})
    a = {e.headers["Idempotency-Key"] for e in upstream.executions if e.path == "/flaky/a"}
    b = {e.headers["Idempotency-Key"] for e in upstream.executions if e.path == "/flaky/b"}
    assert len(a) == len(b) == 1 and a != b


async def test_upstream_key_for_a_body_key_and_none_without_the_setting(make_proxy,
                                                                        upstream, client):
    """A body-derived key reaches the upstream as a header too; a route without
    upstream_key sends none (the client's own header passes as it was)."""
    p = await make_proxy(KEYED)
    await post(client, p.url + "/exec/body", data=b'{"order": 7}',
               headers={"Content-Type": "application/json"})
    key = new_key()
    await post(client, p.url + "/exec/plain", key=key)
    body_exec, plain_exec = upstream.executions
    assert len(body_exec.headers["X-Upstream-Key"]) == 64
    assert "X-Upstream-Key" not in plain_exec.headers
    assert plain_exec.headers["Idempotency-Key"] == key


def test_the_upstream_key_secret_follows_the_installation_secret_not_the_data_keys():
    """Two installations send different values for the same (scope, key); rotating the
    encryption keys of one does not change its value."""
    from proxy.sealing import Sealer, parse_keys

    k1 = parse_keys("k1:" + "A" * 43 + "=", source="t")
    k2 = parse_keys("k2:" + "B" * 43 + "=", source="t")
    a = Sealer(keys=k1, installation_secret=b"a" * 32)
    rotated = Sealer(keys=k2 + k1, installation_secret=b"a" * 32)
    other = Sealer(keys=k1, installation_secret=b"b" * 32)
    assert a.upstream_key_secret == rotated.upstream_key_secret
    assert a.upstream_key_secret != other.upstream_key_secret


def test_derive_is_keyed_when_a_secret_exists():
    """With a secret the value changes with it; without, it is the documented SHA-256."""
    import hashlib

    plain = derive("charges:t", "k", secret=None)
    assert plain == hashlib.sha256(b"idemproxy/upstream-key\x1fcharges:t\x1fk").hexdigest()
    assert derive("charges:t", "k", secret=b"s1") != derive("charges:t", "k", secret=b"s2")
    assert derive("charges:t", "k", secret=b"s1") != plain
