"""Clients' conventions: `mismatch_status` per route, and CORS answers that expose the
proxy's own headers to browser scripts."""

from __future__ import annotations

import json

import pytest

from proxy.config import loads
from proxy.errors import ConfigError
from proxy.http.cors import expose
from tests.test_flow import new_key, post

ROUTES = """
- name: strict
  match: {methods: [POST], path: "/exec/strict/*"}
- name: lenient
  match: {methods: [POST], path: "/exec/lenient/*"}
  mismatch_status: 409
- name: cors
  match: {methods: [POST], path: "/cors/*"}
"""


async def test_mismatch_status_defaults_to_422_and_a_route_may_choose_409(make_proxy,
                                                                         client):
    """Same key, other body: 422 by default, the route's mismatch_status where it is set."""
    p = await make_proxy(ROUTES)
    for path, want in (("/exec/strict/a", 422), ("/exec/lenient/a", 409)):
        key = new_key()
        assert (await post(client, p.url + path, key=key))[0] == 201
        status, headers, body = await post(client, p.url + path, key=key, data=b"{}")
        doc = json.loads(body)
        assert status == want and doc["status"] == want
        assert doc["type"].endswith("/key-reused")
        assert headers["Content-Type"] == "application/problem+json"
    assert p.metric("idemproxy_requests_total", route="lenient", outcome="mismatch") == 1


@pytest.mark.parametrize("value", [418, "'409'", "true", 500])
def test_mismatch_status_accepts_only_400_409_422(value):
    """Any other mismatch_status is a config error naming the field."""
    text = f"routes:\n  - name: r\n    match: {{path: /r}}\n    mismatch_status: {value}\n"
    with pytest.raises(ConfigError, match=r"routes\[0\]\.mismatch_status"):
        loads(text, env={})


async def test_a_cors_answer_exposes_the_replay_and_expiry_headers(make_proxy, upstream,
                                                                  client):
    """First answer and replay both list the proxy's headers in Expose-Headers, after the
    upstream's own names; the replay's header is then readable by a browser script."""
    p = await make_proxy(ROUTES)
    key = new_key()
    url = p.url + "/cors/a?expose=X-Request-Id"
    s1, h1, _ = await post(client, url, key=key)
    s2, h2, _ = await post(client, url, key=key)
    assert (s1, s2) == (201, 201) and upstream.count("/cors/a") == 1
    for h in (h1, h2):
        names = [n.strip() for n in h["Access-Control-Expose-Headers"].split(",")]
        assert names[0] == "X-Request-Id"
        assert {"Idempotent-Replayed", "Idempotency-Expires"} <= set(names)
    assert h2["Idempotent-Replayed"] == "true"


async def test_an_answer_without_allow_origin_gets_no_expose_headers(make_proxy, client):
    """The proxy never makes a non-CORS answer a CORS one."""
    p = await make_proxy(ROUTES)
    key = new_key()
    for _ in range(2):
        _, headers, _ = await post(client, p.url + "/exec/strict/b", key=key)
        assert "Access-Control-Expose-Headers" not in headers


def test_expose_does_not_repeat_names_already_listed():
    """A name the upstream already exposes (any case) is not added twice."""
    from multidict import CIMultiDict

    h = CIMultiDict({"Access-Control-Allow-Origin": "*",
                     "Access-Control-Expose-Headers": "idempotent-replayed, X-A"})
    expose(h, ("Idempotent-Replayed", "Idempotency-Expires"))
    assert h["Access-Control-Expose-Headers"] == \
        "idempotent-replayed, X-A, Idempotency-Expires"
