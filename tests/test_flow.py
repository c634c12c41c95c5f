"""The HTTP contract (design.md §2) over real sockets, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from tests.conftest import free_port
from tests.upstream import TestUpstream, body_json


def new_key() -> str:
    return uuid.uuid4().hex


async def post(client: aiohttp.ClientSession, url: str, *, key: str | None = None,
               data: bytes = b'{"amount": 100}', headers: dict[str, str] | None = None,
               method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    h = dict(headers or {})
    if key is not None:
        h["Idempotency-Key"] = key
    async with client.request(method, url, data=data, headers=h) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_first_request_runs_once_and_retry_replays(make_proxy, upstream, client):
    """A retry after completion gets the stored status, headers and body, marked replayed."""
    p = await make_proxy()
    key = new_key()
    s1, h1, b1 = await post(client, p.url + "/exec/a", key=key)
    s2, h2, b2 = await post(client, p.url + "/exec/a", key=key)
    assert (s1, s2) == (201, 201)
    assert b1 == b2 and body_json(b1)["n"] == 1
    assert upstream.count("/exec/a") == 1
    assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"
    assert h1["Idempotency-Expires"] == h2["Idempotency-Expires"]
    assert h2["Content-Type"] == h1["Content-Type"]
    assert p.metric("idemproxy_requests_total", route="exec", outcome="replayed") == 1


async def test_fifty_simultaneous_duplicates_execute_once(make_proxy, upstream, client):
    """50 concurrent requests with one key: exactly one upstream execution."""
    p = await make_proxy()
    key = new_key()
    results = await asyncio.gather(*[
        post(client, p.url + "/exec/fifty?delay=0.2", key=key) for _ in range(50)])
    assert upstream.count("/exec/fifty") == 1
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) <= {201, 409}
    assert statuses.count(201) >= 1
    for status, headers, _ in results:
        if status == 409:
            assert headers["Content-Type"] == "application/problem+json"
            assert int(headers["Retry-After"]) >= 1


async def test_two_tenants_same_key_execute_twice(make_proxy, upstream, client):
    """Keys are scoped by tenant (Authorization): same key, two tenants, two executions."""
    p = await make_proxy()
    key = new_key()
    _, _, a = await post(client, p.url + "/exec/t", key=key, headers={"Authorization": "A"})
    _, _, b = await post(client, p.url + "/exec/t", key=key, headers={"Authorization": "B"})
    _, h, a2 = await post(client, p.url + "/exec/t", key=key, headers={"Authorization": "A"})
    assert upstream.count("/exec/t") == 2
    assert body_json(a)["n"] == 1 and body_json(b)["n"] == 2
    assert a2 == a and h["Idempotent-Replayed"] == "true"


async def test_different_fingerprint_is_422_and_original_still_replays(make_proxy, upstream,
                                                                        client):
    """Same key, different body: 422 problem+json; the first response still replays."""
    p = await make_proxy()
    key = new_key()
    _, _, first = await post(client, p.url + "/exec/fp", key=key, data=b"one")
    s, h, body = await post(client, p.url + "/exec/fp", key=key, data=b"two")
    assert s == 422 and h["Content-Type"] == "application/problem+json"
    assert "Idempotency-Expires" in h
    assert body_json(body)["type"] == "https://idemproxy.dev/errors/key-reused"
    s3, h3, again = await post(client, p.url + "/exec/fp", key=key, data=b"one")
    assert (s3, again, h3["Idempotent-Replayed"]) == (201, first, "true")
    assert upstream.count("/exec/fp") == 1


async def test_query_change_is_a_different_fingerprint(make_proxy, client):
    """The query string is part of the fingerprint."""
    p = await make_proxy()
    key = new_key()
    assert (await post(client, p.url + "/exec/q?x=1", key=key))[0] == 201
    assert (await post(client, p.url + "/exec/q?x=2", key=key))[0] == 422


async def test_in_flight_retry_gets_409_with_retry_after(make_proxy, upstream, client):
    """While the first request runs, a retry gets 409 + Retry-After and is not forwarded."""
    p = await make_proxy()
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/gate/x", key=key))
    while upstream.count("/gate/x") == 0:
        await asyncio.sleep(0.01)
    s, h, body = await post(client, p.url + "/gate/x", key=key)
    assert s == 409 and h["Retry-After"] == "1" and "Idempotency-Expires" in h
    assert body_json(body)["type"] == "https://idemproxy.dev/errors/key-in-flight"
    upstream.gate.set()
    assert (await first)[0] == 201
    assert upstream.count("/gate/x") == 1


async def test_concurrent_wait_holds_retry_then_replays(make_proxy, upstream, client):
    """concurrent: wait holds the retry until the first completes, then replays it."""
    p = await make_proxy("""
        - name: waiting
          match: {methods: [POST], path: "/gate/*"}
          concurrent: wait
          wait_timeout: 10s
    """)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/gate/w", key=key))
    while upstream.count("/gate/w") == 0:
        await asyncio.sleep(0.01)
    second = asyncio.create_task(post(client, p.url + "/gate/w", key=key))
    await asyncio.sleep(0.3)
    assert not second.done()
    upstream.gate.set()
    (s1, _, b1), (s2, h2, b2) = await first, await second
    assert (s1, s2) == (201, 201) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    assert upstream.count("/gate/w") == 1


async def test_concurrent_wait_times_out_with_409(make_proxy, upstream, client):
    """A waiting retry gives up after wait_timeout with 409."""
    p = await make_proxy("""
        - name: waiting
          match: {methods: [POST], path: "/gate/*"}
          concurrent: wait
          wait_timeout: 300ms
    """)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/gate/t", key=key))
    while upstream.count("/gate/t") == 0:
        await asyncio.sleep(0.01)
    s, _, _ = await post(client, p.url + "/gate/t", key=key)
    assert s == 409
    upstream.gate.set()
    await first


async def test_missing_key_on_require_key_route_is_400(make_proxy, upstream, client):
    """require_key: true and no key: 400 problem+json, upstream not called."""
    p = await make_proxy()
    s, h, body = await post(client, p.url + "/gate/nokey")
    assert s == 400 and h["Content-Type"] == "application/problem+json"
    doc = body_json(body)
    assert doc["type"] == "https://idemproxy.dev/errors/key-missing" and doc["status"] == 400
    assert upstream.count() == 0


async def test_no_key_without_require_key_streams_through_unguarded(make_proxy, upstream,
                                                                     client):
    """No key, require_key false: forwarded each time, counted as pass-through."""
    p = await make_proxy()
    await post(client, p.url + "/exec/free")
    await post(client, p.url + "/exec/free")
    assert upstream.count("/exec/free") == 2
    assert p.metric("idemproxy_requests_total", route="exec", outcome="pass_through") == 2


@pytest.mark.parametrize("bad", ["", " ", "x" * 256, "clé", "tab\there", '"unterminated'])
async def test_malformed_keys_are_400(make_proxy, upstream, client, bad):
    """Empty, over 255 chars, non-printable or non-ASCII keys: 400, never forwarded."""
    p = await make_proxy()
    async with client.post(p.url + "/exec/bad", data=b"x",
                           headers={"Idempotency-Key": bad}) as resp:
        assert resp.status == 400
        assert resp.headers["Content-Type"] == "application/problem+json"
    assert upstream.count() == 0


async def test_two_key_headers_are_400(make_proxy, upstream, client):
    """More than one key header is ambiguous: 400."""
    p = await make_proxy()
    headers = aiohttp.typedefs.CIMultiDict([("Idempotency-Key", "a"), ("Idempotency-Key", "b")])
    async with client.post(p.url + "/exec/two", data=b"x", headers=headers) as resp:
        assert resp.status == 400
    assert upstream.count() == 0


async def test_sf_string_key_equals_bare_token(make_proxy, upstream, client):
    """An RFC 8941 sf-string key "abc" is the same key as the bare token abc."""
    p = await make_proxy()
    key = new_key()
    await post(client, p.url + "/exec/sf", key=f'"{key}"')
    _, h, _ = await post(client, p.url + "/exec/sf", key=key)
    assert h.get("Idempotent-Replayed") == "true" and upstream.count("/exec/sf") == 1


async def test_body_over_limit_is_413(make_proxy, upstream, client):
    """Over max_request_body: 413, for Content-Length and chunked bodies alike."""
    p = await make_proxy("""
        - name: small
          match: {methods: [POST], path: "/exec/*"}
          max_request_body: 1KiB
    """)
    s, h, _ = await post(client, p.url + "/exec/big", key=new_key(), data=b"x" * 2048)
    assert s == 413 and h["Content-Type"] == "application/problem+json"

    async def chunks():
        for _ in range(4):
            yield b"y" * 512
    async with client.post(p.url + "/exec/big", data=chunks(),
                           headers={"Idempotency-Key": new_key()}) as resp:
        assert resp.status == 413
    assert upstream.count() == 0


async def test_a_chunked_body_that_arrives_with_its_headers_is_limited_and_kept_whole(
        make_proxy, upstream):
    """Request, chunks and terminator in one packet (the body is read without waiting):
    over the limit it is a 413, within it the upstream gets every byte."""
    p = await make_proxy("""
        - name: small
          match: {methods: [POST], path: "/exec/*"}
          max_request_body: 1KiB
    """)
    port = int(p.url.rsplit(":", 1)[1])

    async def send_whole(body: bytes) -> bytes:
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c)
                           for c in (body[:600], body[600:]) if c) + b"0\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /exec/whole HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer raw\r\nIdempotency-Key: "
                     + new_key().encode() + b"\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n" + chunked)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    assert (await send_whole(b"z" * 1100)).startswith(b"HTTP/1.1 413")
    assert upstream.count("/exec/whole") == 0
    assert (await send_whole(b"w" * 1000)).startswith(b"HTTP/1.1 201")
    assert upstream.executions[-1].body == b"w" * 1000


async def test_upstream_refused_is_502_and_key_released(make_proxy, client):
    """Connection refused: 502 problem+json and the key released, so a retry forwards.
    The detail does not tell the client where the upstream is."""
    port = free_port()
    p = await make_proxy(upstream_url=f"http://127.0.0.1:{port}")
    key = new_key()
    s, h, body = await post(client, p.url + "/exec/down", key=key)
    assert s == 502 and body_json(body)["type"].endswith("/upstream-unreachable")
    assert str(port) not in body.decode() and "127.0.0.1" not in body.decode()
    s2, _, body2 = await post(client, p.url + "/exec/down", key=key)
    assert s2 == 502 and body_json(body2)["type"].endswith("/upstream-unreachable")
    assert await p.deps.store.show(scope="exec:" + _tenant(""), key=key) is None


def _tenant(authorization: str) -> str:
    import hashlib
    return hashlib.sha256(authorization.encode()).hexdigest()[:32]


@pytest.mark.parametrize("status", [429, 503])
async def test_release_statuses_pass_through_and_release(make_proxy, upstream, client, status):
    """A release status reaches the client but is not stored: the retry executes again."""
    p = await make_proxy()
    key = new_key()
    s1, _, _ = await post(client, p.url + f"/exec/rel{status}?status={status}", key=key)
    s2, h2, _ = await post(client, p.url + f"/exec/rel{status}?status={status}", key=key)
    assert (s1, s2) == (status, status) and "Idempotent-Replayed" not in h2
    assert upstream.count(f"/exec/rel{status}") == 2


async def test_server_error_500_is_stored_and_replayed(make_proxy, upstream, client):
    """Any other status (500 included) is stored and replayed."""
    p = await make_proxy()
    key = new_key()
    await post(client, p.url + "/exec/e500?status=500", key=key)
    s, h, _ = await post(client, p.url + "/exec/e500?status=500", key=key)
    assert s == 500 and h["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/e500") == 1


async def test_expired_key_is_a_new_key(make_proxy, upstream, client):
    """After ttl the key is treated as new and executes again."""
    p = await make_proxy("""
        - name: short
          match: {methods: [POST], path: "/exec/*"}
          ttl: 1s
          lock_timeout: 1s
    """)
    key = new_key()
    await post(client, p.url + "/exec/ttl", key=key)
    await asyncio.sleep(1.2)
    _, h, body = await post(client, p.url + "/exec/ttl", key=key)
    assert "Idempotent-Replayed" not in h and body_json(body)["n"] == 2


async def test_replay_header_policy(make_proxy, upstream, client):
    """Multi-value headers replay as sent; Set-Cookie is not stored; Date/Server are fresh."""
    p = await make_proxy()
    key = new_key()
    async with client.post(p.url + "/headers", data=b"x",
                           headers={"Idempotency-Key": key}) as r1:
        assert r1.headers.getall("Set-Cookie") == ["session=secret; HttpOnly"]
        assert r1.headers["Server"] == "upstream/1"
    async with client.post(p.url + "/headers", data=b"x",
                           headers={"Idempotency-Key": key}) as r2:
        assert r2.headers["Idempotent-Replayed"] == "true"
        assert r2.headers.getall("X-Multi") == ["one", "two"]
        assert r2.headers["Cache-Control"] == "no-store"
        assert "Set-Cookie" not in r2.headers
        assert r2.headers["Server"] != "upstream/1" and "Date" in r2.headers
        assert await r2.read() == b"h"


async def test_replay_set_cookie_opt_in(make_proxy, upstream, client):
    """replay_set_cookie: true stores and replays Set-Cookie."""
    p = await make_proxy("""
        - name: cookies
          match: {methods: [POST], path: "/headers"}
          replay_set_cookie: true
    """)
    key = new_key()
    await post(client, p.url + "/headers", key=key)
    _, h, _ = await post(client, p.url + "/headers", key=key)
    assert h["Idempotent-Replayed"] == "true" and h["Set-Cookie"].startswith("session=")


async def test_safe_methods_and_unmatched_paths_pass_through(make_proxy, upstream, client):
    """GET is never guarded; hop-by-hop headers dropped; X-Forwarded-* added."""
    p = await make_proxy()
    key = new_key()
    for _ in range(2):
        async with client.get(p.url + "/echo/x?a=1", headers={
                "Idempotency-Key": key, "Connection": "keep-alive, X-Hop", "X-Hop": "1",
                "X-End": "2"}) as resp:
            doc = await resp.json()
            assert "Idempotent-Replayed" not in resp.headers
    assert upstream.count("/echo") == 2
    assert doc["query"] == "a=1" and doc["headers"]["X-End"] == "2"
    assert "X-Hop" not in doc["headers"]
    assert doc["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert doc["headers"]["X-Forwarded-Proto"] == "http"


async def test_no_cookie_from_one_client_reaches_the_upstream_for_another(
        make_proxy, upstream, client):
    """The upstream leg keeps no cookie jar: a Set-Cookie answered to one client is never
    sent upstream with another client's request (a cross-tenant leak). The upstream is
    named by host name, since aiohttp's default jar ignores cookies from IP addresses."""
    p = await make_proxy(upstream_url=upstream.url.replace("127.0.0.1", "localhost"))
    async with aiohttp.ClientSession() as alice:
        async with alice.get(p.url + "/headers") as r:
            assert r.headers["Set-Cookie"].startswith("session=")
    async with aiohttp.ClientSession() as bob:
        async with bob.get(p.url + "/echo/bob") as r:
            doc = await r.json()
        assert "Cookie" not in doc["headers"]
        async with bob.get(p.url + "/echo/bob", headers={"Cookie": "mine=1"}) as r:
            doc = await r.json()
        assert doc["headers"]["Cookie"] == "mine=1"  # a client's own cookie goes through


async def test_pass_through_streams_request_body(make_proxy, upstream, client):
    """An unguarded request body reaches the upstream byte for byte."""
    p = await make_proxy()
    payload = bytes(range(256)) * 100
    async with client.request("PATCH", p.url + "/echo", data=payload) as resp:
        doc = await resp.json()
    assert doc["body"].encode("latin-1") == payload


async def test_header_lines_up_to_16_kib_are_read(make_proxy, client):
    """The proxied port reads header fields of up to 16 KiB (aiohttp's default is 8 KiB):
    such a request reaches the flow and gets the flow's answer, not a framing refusal."""
    p = await make_proxy()
    s, _, body = await post(client, p.url + "/gate/x", headers={"X-Big": "b" * 12_000})
    assert s == 400 and body_json(body)["type"].endswith("/key-missing")


async def test_problem_errors_are_rfc9457(make_proxy, client):
    """Errors carry type, title, status and detail as application/problem+json."""
    p = await make_proxy()
    _, h, body = await post(client, p.url + "/gate/x")
    doc = body_json(body)
    assert set(doc) >= {"type", "title", "status", "detail"}
    assert h["Content-Type"] == "application/problem+json"


async def test_admin_port_serves_health_ready_metrics(make_proxy, client):
    """/healthz, /readyz and /metrics live on the admin port, not the proxied one."""
    p = await make_proxy()
    async with client.get(p.admin_url + "/healthz") as r:
        assert r.status == 200
    async with client.get(p.admin_url + "/readyz") as r:
        assert r.status == 200
    await post(client, p.url + "/exec/m", key=new_key())
    async with client.get(p.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'idemproxy_requests_total{outcome="forwarded",route="exec"} 1.0' in text
    async with client.get(p.url + "/metrics") as r:
        assert "idemproxy_requests_total" not in await r.text()


async def test_upstream_unused_for_rejections(make_proxy, upstream: TestUpstream, client):
    """Rejected requests (400/409/413/422) never reach the upstream."""
    p = await make_proxy()
    await post(client, p.url + "/gate/nokey")
    assert upstream.count() == 0


def test_upstream_credentials_are_redacted_for_logs():
    """An upstream URL with user:password never reaches the start-up log line."""
    from proxy.server import redact_url

    assert redact_url("http://user:pw@api:9000/base") == "http://***@api:9000/base"
    assert redact_url("http://api:9000") == "http://api:9000"


async def test_head_passes_the_upstreams_content_length(make_proxy, client):
    """HEAD through the proxy keeps the upstream's Content-Length and sends no body."""
    p = await make_proxy()
    async with client.get(p.url + "/plain") as r:
        full = await r.read()
    async with client.head(p.url + "/plain") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(full))
        assert await r.read() == b""


async def test_round_trips_one_per_replay_two_per_first_request(make_proxy, client):
    """§8: a first request makes two store calls (claim, complete), a replay one (with the
    replay cache off; tests/test_replay_cache.py has the cached case: none)."""
    p = await make_proxy(extra="replay_cache: 0")

    def calls() -> dict[str, float]:
        return {op: p.metric("idemproxy_store_seconds_count", op=op)
                for op in ("claim", "complete", "release", "chunk", "extend")}

    key = new_key()
    before = calls()
    await post(client, p.url + "/exec/rt", key=key)
    first = calls()
    await post(client, p.url + "/exec/rt", key=key)
    replay = calls()
    assert {k: first[k] - before[k] for k in first} == {
        "claim": 1, "complete": 1, "release": 0, "chunk": 0, "extend": 0}
    assert {k: replay[k] - first[k] for k in first} == {
        "claim": 1, "complete": 0, "release": 0, "chunk": 0, "extend": 0}
