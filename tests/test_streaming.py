"""Streaming capture and replay, body limits, client hang-ups, and the send-once upstream
leg (issue #3), over real sockets against real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

import aiohttp
import pytest

from proxy.config import loads
from proxy.server import check_parser
from tests.test_flow import post
from tests.upstream import body_json, pattern


def new_key() -> str:
    return uuid.uuid4().hex


@pytest.mark.parametrize("length", ["0", "1"])
async def test_large_body_streams_and_replays_byte_exact(make_proxy, upstream, client, length):
    """A 5 MiB binary body (chunked or with Content-Length) replays byte for byte."""
    p = await make_proxy()
    key, size = new_key(), 5 * 2**20 + 123
    url = p.url + f"/big?size={size}&length={length}"
    s1, h1, b1 = await post(client, url, key=key)
    s2, h2, b2 = await post(client, url, key=key)
    assert (s1, s2) == (200, 200)
    assert b1 == pattern(size) and b2 == b1
    assert h2["Idempotent-Replayed"] == "true" and h2["Content-Length"] == str(size)
    assert upstream.count("/big") == 1


async def test_body_over_max_stored_body_is_omitted_never_reexecuted(make_proxy, upstream,
                                                                      client):
    """Above max_stored_body the first client gets it all; retries get status and headers,
    an empty body and Idempotency-Body: omitted — never a second execution."""
    p = await make_proxy("""
        - name: capped
          match: {methods: [POST], path: /big}
          max_stored_body: 1MiB
    """)
    key, size = new_key(), 3 * 2**20
    s1, _, b1 = await post(client, p.url + f"/big?size={size}", key=key)
    assert s1 == 200 and b1 == pattern(size)
    s2, h2, b2 = await post(client, p.url + f"/big?size={size}", key=key)
    assert (s2, b2) == (200, b"")
    assert h2["Idempotent-Replayed"] == "true" and h2["Idempotency-Body"] == "omitted"
    assert h2["Content-Type"] == "application/octet-stream"
    assert upstream.count("/big") == 1


async def test_client_hangup_before_answer_still_records(make_proxy, upstream, client):
    """A client that times out before the upstream answers: the retry gets the replay."""
    p = await make_proxy()
    key = new_key()
    with pytest.raises(asyncio.TimeoutError):
        async with client.post(p.url + "/gate/h", data=b"x", headers={"Idempotency-Key": key},
                               timeout=aiohttp.ClientTimeout(total=0.3)) as resp:
            await resp.read()
    upstream.gate.set()
    for _ in range(50):  # the proxy finishes recording in the background of the hang-up
        s, h, body = await post(client, p.url + "/gate/h", key=key, data=b"x")
        if s != 409:
            break
        await asyncio.sleep(0.05)
    assert s == 201 and h["Idempotent-Replayed"] == "true" and body_json(body)["n"] == 1
    assert upstream.count("/gate/h") == 1


async def test_put_is_never_resent_on_a_dropped_keepalive_connection(make_proxy, upstream,
                                                                      client):
    """The upstream executes a PUT then drops the pooled connection: one execution, 502,
    no silent re-send (aiohttp's client retries idempotent methods unless told not to)."""
    p = await make_proxy()
    await post(client, p.url + "/exec/warm", key=new_key(), method="PUT")  # pool a connection
    s, _, body = await post(client, p.url + "/reset/put", key=new_key(), method="PUT")
    assert s == 502 and body_json(body)["type"].endswith("/upstream-failed")
    await asyncio.sleep(0.2)
    assert upstream.count("/reset/put") == 1


async def test_reset_after_send_keeps_key_claimed(make_proxy, upstream, client):
    """Reset after sending: 502, outcome unknown, so a retry in the lease gets 409."""
    p = await make_proxy()
    key = new_key()
    s1, _, _ = await post(client, p.url + "/reset/a", key=key)
    s2, _, b2 = await post(client, p.url + "/reset/a", key=key)
    assert s1 == 502 and s2 == 409 and body_json(b2)["type"].endswith("/key-in-flight")
    assert upstream.count("/reset/a") == 1


async def test_unknown_outcome_retry_forwards_again_after_lease(make_proxy, upstream, client):
    """unknown_outcome: retry — once the lease ends, and the proxy saw the claim's
    heartbeat unchanged for a lease of its own clock, a retry takes the claim over."""
    p = await make_proxy("""
        - name: retrying
          match: {methods: [POST], path: "/reset/*"}
          lock_timeout: 500ms
          unknown_outcome: retry
    """)
    key = new_key()
    await post(client, p.url + "/reset/r", key=key)
    assert (await post(client, p.url + "/reset/r", key=key))[0] == 409  # seen in flight
    await asyncio.sleep(0.7)
    s, _, _ = await post(client, p.url + "/reset/r", key=key)
    assert s == 502 and upstream.count("/reset/r") == 2
    assert p.metric("idemproxy_claims_taken_over_total", route="retrying") == 1


async def test_unknown_outcome_fail_replays_the_stored_error(make_proxy, upstream, client):
    """unknown_outcome: fail — the failure is stored and replayed, never re-executed."""
    p = await make_proxy("""
        - name: failing
          match: {methods: [POST], path: "/reset/*"}
          unknown_outcome: fail
    """)
    key = new_key()
    s1, _, b1 = await post(client, p.url + "/reset/f", key=key)
    s2, h2, b2 = await post(client, p.url + "/reset/f", key=key)
    assert (s1, s2) == (502, 502) and b1 == b2 and h2["Idempotent-Replayed"] == "true"
    assert upstream.count("/reset/f") == 1


async def test_upstream_timeout_is_504_and_key_stays_claimed(make_proxy, upstream, client):
    """No answer within upstream.timeout: 504; the key stays claimed (409 on retry)."""
    p = await make_proxy(upstream_timeout="300ms")
    key = new_key()
    s1, _, b1 = await post(client, p.url + "/stall/t", key=key)
    s2, _, _ = await post(client, p.url + "/stall/t", key=key)
    assert s1 == 504 and body_json(b1)["type"].endswith("/upstream-timeout")
    assert s2 == 409 and upstream.count("/stall/t") == 1


async def test_host_header_never_selects_another_upstream(make_proxy, upstream, client):
    """A client's Host header is passed on as X-Forwarded-Host; the upstream is fixed."""
    p = await make_proxy()
    async with client.post(p.url + "/echo", data=b"x",
                           headers={"Host": "evil.example:81"}) as resp:
        doc = await resp.json()
    assert doc["headers"]["X-Forwarded-Host"] == "evil.example:81"
    assert doc["headers"]["Host"] == upstream.url.removeprefix("http://")


async def test_conflicting_framing_is_rejected_before_the_upstream(make_proxy, upstream):
    """Content-Length together with Transfer-Encoding: 400 and never forwarded."""
    p = await make_proxy()
    host, port = p.url.removeprefix("http://").split(":")
    raw = (b"POST /exec/smuggle HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
           b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split()[1] == b"400"
    assert b"Content-Type: application/problem+json" in answer
    assert b'"type": "https://idemproxy.dev/errors/bad-request"' in answer
    assert upstream.count("/exec/smuggle") == 0


def test_refuses_to_start_without_the_c_parser(monkeypatch):
    """Without aiohttp's C HTTP parser the proxy refuses to start unless allowed."""
    from aiohttp import http_parser, web_protocol

    monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    with pytest.raises(RuntimeError, match="C HTTP parser"):
        check_parser(loads("{}", env={}))
    check_parser(loads("allow_python_parser: true", env={}))


def test_c_parser_is_active_here():
    """The default install runs on the C parser, so serve starts."""
    check_parser(loads("{}", env={}))


async def test_live_claim_keeps_its_lease_under_a_slow_upstream(make_proxy, upstream, client):
    """A request slower than lock_timeout is not taken over while its proxy is alive."""
    p = await make_proxy("""
        - name: slow
          match: {methods: [POST], path: "/exec/*"}
          lock_timeout: 600ms
    """)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/exec/slow?delay=1.6", key=key))
    await asyncio.sleep(1.1)  # well past the first lease
    s, _, _ = await post(client, p.url + "/exec/slow?delay=1.6", key=key)
    assert s == 409
    assert (await first)[0] == 201
    _, h, _ = await post(client, p.url + "/exec/slow?delay=1.6", key=key)
    assert h["Idempotent-Replayed"] == "true" and upstream.count("/exec/slow") == 1
