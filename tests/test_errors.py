"""The error tree (proxy/errors.py): one renderer, one mapping, and every guarded error
answer carrying the key's window (design §2: every guarded response has
Idempotency-Expires)."""

from __future__ import annotations

import asyncio
import inspect
import json
import uuid

from proxy import errors
from tests.conftest import free_port
from tests.test_flow import post
from tests.upstream import body_json


def test_every_problem_has_a_distinct_type_and_a_client_status():
    """Each ProblemError class has its own type URI slug and an HTTP error status."""
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)
               if issubclass(c, errors.ProblemError) and c is not errors.ProblemError
               and c is not errors.HTTPProblem]
    slugs = [c.slug for c in classes]
    assert len(slugs) == len(set(slugs))
    assert all(400 <= c.status <= 599 for c in classes)


def test_problem_body_is_rfc9457():
    """The one renderer writes type, title, status and detail, in that order."""
    doc = json.loads(errors.KeyReused("other body").body())
    assert list(doc) == ["type", "title", "status", "detail"]
    assert doc["type"] == "https://idemproxy.dev/errors/key-reused" and doc["status"] == 422


def test_store_unavailable_is_one_503_with_retry_after():
    """A failed store maps to 503 store-unavailable with Retry-After, from one function."""
    p = errors.store_unavailable()
    assert (p.status, p.slug, p.headers) == (503, "store-unavailable", {"Retry-After": "1"})
    assert issubclass(errors.StoreUnavailable, errors.StoreError)


def test_aiohttp_statuses_map_to_named_problems():
    """404 and 405 become NotFound and MethodNotAllowed; other statuses keep their reason."""
    assert type(errors.for_http_status(404, reason="Not Found", detail="x")) is errors.NotFound
    p = errors.for_http_status(405, reason="x", detail="x", headers={"Allow": "GET"})
    assert type(p) is errors.MethodNotAllowed and p.headers == {"Allow": "GET"}
    other = errors.for_http_status(413, reason="Request Entity Too Large", detail="x")
    assert (other.status, other.title, other.slug) == (413, "Request Entity Too Large",
                                                        "http-error")


async def test_wait_timeout_409_carries_idempotency_expires(make_proxy, upstream, client):
    """The 409 of a `concurrent: wait` retry that timed out names the key's window end,
    like the reject 409 does."""
    p = await make_proxy("""
        - name: waiting
          match: {methods: [POST], path: "/gate/*"}
          concurrent: wait
          wait_timeout: 300ms
    """)
    key = uuid.uuid4().hex
    first = asyncio.create_task(post(client, p.url + "/gate/x", key=key))
    while upstream.count("/gate/x") == 0:
        await asyncio.sleep(0.01)
    s, h, body = await post(client, p.url + "/gate/x", key=key)
    assert s == 409 and body_json(body)["type"].endswith("/key-in-flight")
    assert h["Retry-After"] == "1" and "Idempotency-Expires" in h
    upstream.gate.set()
    _, h1, _ = await first
    assert h["Idempotency-Expires"] == h1["Idempotency-Expires"]


async def test_upstream_502_carries_idempotency_expires(make_proxy, client):
    """A guarded 502 (upstream refused) carries Idempotency-Expires; an unguarded one not."""
    p = await make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    s, h, _ = await post(client, p.url + "/exec/down", key=uuid.uuid4().hex)
    assert s == 502 and "Idempotency-Expires" in h
    s, h, _ = await post(client, p.url + "/exec/down")
    assert s == 502 and "Idempotency-Expires" not in h


async def test_upstream_reset_502_carries_idempotency_expires(make_proxy, upstream, client):
    """A guarded 502 after the request was sent (reset, outcome unknown) carries it too."""
    p = await make_proxy()
    s, h, body = await post(client, p.url + "/reset/x", key=uuid.uuid4().hex)
    assert s == 502 and body_json(body)["type"].endswith("/upstream-failed")
    assert "Idempotency-Expires" in h
