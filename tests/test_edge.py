"""The edge holds (issue #17), over real sockets: scopes never leak, one path has one
meaning, `Expect: 100-continue` never hangs, one verdict per upstream answer, and a live
lease outlives the window."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tests.test_flow import new_key, post
from tests.upstream import body_json

ROUTES = """
- name: charges
  match: {methods: [POST], path: /v1/charges}
  require_key: true
- name: shared
  match: {methods: [POST], path: "/anon/*"}
  tenant: {missing: share}
- name: by-api-key
  match: {methods: [POST], path: "/apikey/*"}
  tenant: {header: X-Api-Key}
- name: strict
  match: {methods: [POST], path: /strict/charges, trailing_slash: strict}
  require_key: true
- name: caseless
  match: {methods: [POST], path: /Case/Charges, case_insensitive: true}
  require_key: true
- name: orders
  match: {methods: [PUT], path: "/orders/{order_id}"}
  key: {path: order_id}
- name: exec
  match: {methods: [POST, PUT], path: "/exec/*"}
"""
AUTH = "Bearer sk_a"


@dataclass
class Answer:
    statuses: list[int]
    head: bytes
    body: bytes
    closed: bool

    @property
    def status(self) -> int:
        return self.statuses[-1] if self.statuses else 0

    def json(self) -> dict[str, object]:
        doc: dict[str, object] = json.loads(self.body)
        return doc


async def read_answer(reader: asyncio.StreamReader, *, timeout: float = 10.0) -> Answer:
    """One final response (after any 1xx): head and Content-Length body."""
    statuses: list[int] = []
    async with asyncio.timeout(timeout):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            statuses.append(status)
            if status >= 200:
                break
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = await reader.readexactly(int(m.group(1))) if m else b""
    return Answer(statuses, head, body, closed=False)


async def raw(port: int, method: str, target: str, *, headers: dict[str, str] | None = None,
              body: bytes = b"") -> Answer:
    """Send one request exactly as written (no client-side URL normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test", "Connection: close",
                 f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- 1. scopes never leak --------------------------------------------------------------

@pytest.mark.parametrize("auth", [None, "", "   "])
async def test_a_guarded_request_without_a_credential_is_refused(make_proxy, upstream,
                                                                 auth):
    """No Authorization (missing, empty or blank) on a default-tenant route: 400 naming it."""
    p = await make_proxy(ROUTES)
    headers = {"Idempotency-Key": new_key()}
    if auth is not None:
        headers["Authorization"] = auth
    got = await raw(port_of(p.url), "POST", "/exec/pay", headers=headers, body=b"{}")
    assert got.status == 400 and b"application/problem+json" in got.head
    doc = got.json()
    assert doc["type"] == "https://idemproxy.dev/errors/credential-missing"
    assert "Authorization" in str(doc["detail"])
    assert upstream.count("/exec/pay") == 0


async def test_client_b_without_a_credential_never_gets_client_as_answer(make_proxy,
                                                                         upstream, client):
    """The finding: B sends A's key and body with no credential and gets a 400, not A's
    stored charge; with its own credential it gets its own execution."""
    p = await make_proxy(ROUTES)
    key = new_key()
    s1, _, a = await post(client, p.url + "/exec/charge", key=key)
    anon = await raw(port_of(p.url), "POST", "/exec/charge",
                     headers={"Idempotency-Key": key}, body=b'{"amount": 100}')
    assert s1 == 201 and anon.status == 400 and b"Idempotent-Replayed" not in anon.head
    _, h, b = await post(client, p.url + "/exec/charge", key=key,
                         headers={"Authorization": "Bearer sk_b"})
    assert "Idempotent-Replayed" not in h and body_json(b)["n"] != body_json(a)["n"]
    assert upstream.count("/exec/charge") == 2


async def test_missing_share_lets_anonymous_requests_share_one_scope(make_proxy, upstream):
    """`tenant: {missing: share}` is the explicit opt-in: anonymous retries replay."""
    p = await make_proxy(ROUTES)
    key = new_key()
    first = await raw(port_of(p.url), "POST", "/anon/x", headers={"Idempotency-Key": key})
    again = await raw(port_of(p.url), "POST", "/anon/x", headers={"Idempotency-Key": key})
    assert (first.status, again.status) == (200, 200)
    assert b"Idempotent-Replayed: true" in again.head and upstream.count("/anon/x") == 1


async def test_a_tenant_header_route_names_its_header(make_proxy, upstream):
    """`tenant: {header: X-Api-Key}` refuses a request without X-Api-Key, naming it."""
    p = await make_proxy(ROUTES)
    got = await raw(port_of(p.url), "POST", "/apikey/x",
                    headers={"Idempotency-Key": new_key(), "Authorization": AUTH})
    assert got.status == 400 and "X-Api-Key" in str(got.json()["detail"])
    assert upstream.count("/apikey/x") == 0


async def test_unguarded_requests_need_no_credential(make_proxy, upstream):
    """Without a key a request is not guarded, so no tenant is needed: it streams through."""
    p = await make_proxy(ROUTES)
    got = await raw(port_of(p.url), "POST", "/exec/nokey", body=b"{}")
    assert got.status == 201 and upstream.count("/exec/nokey") == 1


@pytest.mark.parametrize("spelling", ["bearer sk_norm", "Bearer  sk_norm", "BEARER sk_norm ",
                                      "Bearer\tsk_norm"])
async def test_credentials_are_normalised_before_hashing(make_proxy, upstream, client,
                                                        spelling):
    """Scheme case and whitespace do not make another tenant: the retry is a replay."""
    p = await make_proxy(ROUTES)
    key = new_key()
    await post(client, p.url + "/exec/norm", key=key, headers={"Authorization": "Bearer sk_norm"})
    got = await raw(port_of(p.url), "POST", "/exec/norm", body=b'{"amount": 100}',
                    headers={"Idempotency-Key": key, "Authorization": spelling})
    assert got.status == 201 and b"Idempotent-Replayed: true" in got.head
    assert upstream.count("/exec/norm") == 1


# --- 2. one path, one meaning ----------------------------------------------------------

SPELLINGS = ["/v1/charges/", "//v1/charges", "/v1//charges", "/v1/./charges",
             "/v1/foo/../charges", "/v1/%63harges", "/v1/%2E/charges"]


@pytest.mark.parametrize("target", SPELLINGS)
async def test_another_spelling_of_a_guarded_path_is_guarded(make_proxy, upstream, target):
    """Each spelling hits the require_key route (400 without a key) and, with one, runs
    once and reaches the upstream as the normalised path."""
    p = await make_proxy(ROUTES)
    port = port_of(p.url)
    before = len(upstream.executions)
    assert (await raw(port, "POST", target, headers={"Authorization": AUTH})).status == 400
    assert len(upstream.executions) == before
    key = new_key()
    h = {"Authorization": AUTH, "Idempotency-Key": key}
    first = await raw(port, "POST", target, headers=h)
    retry = await raw(port, "POST", target, headers=h)
    assert (first.status, retry.status) == (200, 200)
    assert b"Idempotent-Replayed: true" in retry.head
    assert len(upstream.executions) == before + 1
    assert upstream.executions[-1].path == ("/v1/charges/" if target.endswith("/")
                                            else "/v1/charges")


async def test_spellings_of_one_path_share_a_key(make_proxy, upstream):
    """`/v1/./charges` after `/v1/charges` with the same key is the same request: replayed."""
    p = await make_proxy(ROUTES)
    h = {"Authorization": AUTH, "Idempotency-Key": new_key()}
    first = await raw(port_of(p.url), "POST", "/v1/charges", headers=h)
    second = await raw(port_of(p.url), "POST", "//v1/./x/../charges", headers=h)
    assert first.status == second.status == 200
    assert b"Idempotent-Replayed: true" in second.head and upstream.count("/v1/charges") == 1


async def test_path_parameters_on_a_guarded_path_are_refused(make_proxy, upstream):
    """`/v1/charges;x=1` would reach the handler on many frameworks: a 400, never unguarded."""
    p = await make_proxy(ROUTES)
    got = await raw(port_of(p.url), "POST", "/v1/charges;x=1",
                    headers={"Authorization": AUTH, "Idempotency-Key": new_key()})
    assert got.status == 400 and "path parameters" in str(got.json()["detail"])
    assert upstream.count("/v1/charges") == 0


async def test_trailing_slash_strict_and_case_insensitive(make_proxy, upstream):
    """`trailing_slash: strict` leaves `/x/` unmatched; `case_insensitive` guards `/CASE/..`."""
    p = await make_proxy(ROUTES)
    port = port_of(p.url)
    assert (await raw(port, "POST", "/strict/charges/")).status == 200  # unrouted
    assert (await raw(port, "POST", "/strict/charges")).status == 400  # no key
    assert (await raw(port, "POST", "/CASE/charges", headers={"Authorization": AUTH})
            ).status == 400
    assert (await raw(port, "POST", "/case/CHARGES", headers={
        "Authorization": AUTH, "Idempotency-Key": new_key()})).status == 200


async def test_a_path_key_is_read_from_the_normalised_path(make_proxy, upstream):
    """`PUT /orders/%34%32` and `/orders/42/` are order 42: one execution."""
    p = await make_proxy(ROUTES)
    h = {"Authorization": AUTH}
    first = await raw(port_of(p.url), "PUT", "/orders/%34%32", headers=h, body=b"{}")
    second = await raw(port_of(p.url), "PUT", "/orders/42", headers=h, body=b"{}")
    assert first.status == second.status == 200
    assert b"Idempotent-Replayed: true" in second.head and upstream.count("/orders/42") == 1


# --- 3. Expect: 100-continue -----------------------------------------------------------

async def expect_exchange(port: int, target: str, headers: dict[str, str], body: bytes
                          ) -> tuple[Answer, bool]:
    """Send the head with Expect: 100-continue and the body only after a 100 (as curl
    does, without its 1 s fallback): (final answer, whether the body was sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"POST {target} HTTP/1.1", "Host: proxy.test", "Expect: 100-continue",
                 f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if not head.startswith(b"HTTP/1.1 100 "):
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            rest = await reader.readexactly(int(m.group(1))) if m else b""
            return Answer([int(head.split(b" ")[1])], head, rest, False), False
        writer.write(body)
        got = await read_answer(reader)
        got.statuses.insert(0, 100)
        return got, True
    finally:
        writer.close()


async def test_the_proxy_answers_100_continue_and_never_forwards_expect(make_proxy,
                                                                       upstream):
    """A guarded upload gets 100 Continue, then its answer; the upstream sees no Expect."""
    p = await make_proxy(ROUTES)
    got, sent = await expect_exchange(port_of(p.url), "/exec/upload", {
        "Authorization": AUTH, "Idempotency-Key": new_key()}, b"x" * 300_000)
    assert sent and got.statuses == [100, 201]
    e = upstream.executions[-1]
    assert e.body == b"x" * 300_000 and "Expect" not in e.headers


async def test_an_unguarded_upload_gets_100_continue_too(make_proxy, upstream):
    """A streamed, unguarded body (aiohttp's client upstream) gets 100 Continue as well."""
    p = await make_proxy(ROUTES)
    got, sent = await expect_exchange(port_of(p.url), "/exec/stream", {}, b"y" * 300_000)
    assert sent and got.statuses == [100, 201]
    assert "Expect" not in upstream.executions[-1].headers


@pytest.mark.parametrize(("headers", "status"), [
    ({"Authorization": AUTH}, 400),  # require_key and no key
    ({"Idempotency-Key": "k"}, 400),  # no credential
    ({"Authorization": AUTH, "Idempotency-Key": "k", "X-Big": "1"}, 413),
])
async def test_a_refusal_is_sent_instead_of_100_continue(make_proxy, upstream, headers,
                                                         status):
    """A request refused without its body gets the final error, never a 100 first."""
    p = await make_proxy(ROUTES.replace("  require_key: true\n", "  require_key: true\n"
                                        "  max_request_body: 1KiB\n", 1))
    body = b"z" * (4096 if "X-Big" in headers else 10)
    got, sent = await expect_exchange(port_of(p.url), "/v1/charges", headers, body)
    assert not sent and got.statuses == [status]
    assert upstream.count("/v1/charges") == 0


# --- 4 and 3. upstreams that misbehave: one verdict, every wait bounded ---------------

@dataclass
class RawUpstream:
    """An upstream that answers every request with the bytes `answer` returns."""

    answer: Callable[[bytes], list[bytes]]
    requests: list[bytes] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if b"chunked" in head.lower():
                    body = await reader.readuntil(b"0\r\n\r\n")
                else:
                    body = await reader.readexactly(int(m.group(1))) if m else b""
                self.requests.append(head + body)
                for piece in self.answer(head):
                    if piece == b"":
                        await asyncio.sleep(0.2)
                        continue
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., RawUpstream]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Callable[[bytes], list[bytes]]) -> RawUpstream:
        up = RawUpstream(answer)
        server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        up.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return up

    yield start
    for s in servers:
        s.close()


def answer_with(*header_lines: bytes, body: bytes = b"ok") -> Callable[[bytes], list[bytes]]:
    def answer(head: bytes) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in header_lines) +
                b"Content-Length: %d\r\n\r\n" % len(body) + body]
    return answer


@pytest.mark.parametrize(("line", "value"), [
    (b"X-Folded: one\r\n two", "one two"),  # obs-fold (RFC 9112 §5.2)
    (b"X-Folded: one\r\n\ttwo", "one\ttwo"),
])
async def test_an_obs_folded_answer_is_unfolded_and_stored_on_both_clients(
        make_proxy, raw_upstream, line, value):
    """Guarded (our client) and unguarded streamed (aiohttp's) relay the unfolded header;
    the guarded answer is stored: its retry is a replay, not a second execution."""
    up = await raw_upstream(answer_with(line))
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{up.port}")
    h = {"Authorization": AUTH, "Idempotency-Key": new_key()}
    first = await raw(port_of(p.url), "POST", "/exec/f", headers=h)
    retry = await raw(port_of(p.url), "POST", "/exec/f", headers=h)
    assert (first.status, retry.status) == (200, 200)
    assert f"X-Folded: {value}".encode() in first.head
    assert b"Idempotent-Replayed: true" in retry.head and len(up.requests) == 1
    streamed, _ = await expect_exchange(port_of(p.url), "/exec/u", {}, b"b" * 10)
    assert streamed.status == 200 and f"X-Folded: {value}".encode() in streamed.head


@pytest.mark.parametrize(("line", "ok"), [
    (b"X-Big: " + b"v" * 20_000, True),
    (b"X-Big: " + b"v" * 70_000, False),
    (b"X-Folded: one\rtwo", False),  # a bare CR (RFC 9112 §2.2): invalid on both
])
async def test_an_answer_gets_one_verdict_on_both_clients(make_proxy, raw_upstream,
                                                          line, ok):
    """A 20 KB answer header passes on both clients; a 70 KB one or a bare CR fails on
    both, and on a guarded route that failure is stored (the upstream acted), so a
    retry replays it instead of executing again."""
    up = await raw_upstream(answer_with(line))
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{up.port}")
    h = {"Authorization": AUTH, "Idempotency-Key": new_key()}
    first = await raw(port_of(p.url), "POST", "/exec/h", headers=h)
    retry = await raw(port_of(p.url), "POST", "/exec/h", headers=h)
    streamed, _ = await expect_exchange(port_of(p.url), "/exec/u", {}, b"b" * 10)
    want = 200 if ok else 502
    assert (first.status, retry.status, streamed.status) == (want, want, want)
    assert b"Idempotent-Replayed: true" in retry.head
    assert len(up.requests) == 2  # the guarded one once, the streamed one


async def test_endless_interim_responses_end_in_the_upstream_timeout(make_proxy,
                                                                     raw_upstream):
    """An upstream that sends 100 Continue over and over never holds a request past
    upstream.timeout: guarded gets its 504 and the key stays claimed (unknown outcome)."""
    up = await raw_upstream(lambda head: [b"HTTP/1.1 100 Continue\r\n\r\n", b""] * 50)
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{up.port}",
                         upstream_timeout="1s")
    h = {"Authorization": AUTH, "Idempotency-Key": new_key()}
    first = await raw(port_of(p.url), "POST", "/exec/interim", headers=h)
    assert first.status == 504
    retry = await raw(port_of(p.url), "POST", "/exec/interim", headers=h)
    assert retry.status == 409 and len(up.requests) == 1


async def test_endless_interim_responses_to_head_end_in_the_upstream_timeout(
        make_proxy, raw_upstream):
    """The same on aiohttp's client (HEAD): 504, never a request held for ever."""
    up = await raw_upstream(lambda head: [b"HTTP/1.1 100 Continue\r\n\r\n", b""] * 50)
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{up.port}",
                         upstream_timeout="1s")
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(p.url))
    writer.write(b"HEAD /exec/interim HTTP/1.1\r\nHost: x\r\n\r\n")
    try:  # a HEAD answer has no body, whatever its Content-Length says
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 504 ") and len(up.requests) == 1


async def test_an_upstream_that_ignores_expect_does_not_hang_a_streamed_upload(
        make_proxy, raw_upstream):
    """Expect is never forwarded, so an upstream that never sends 100 gets the body at
    once (aiohttp's client would wait for the 100 forever); the upload is answered."""
    up = await raw_upstream(answer_with())
    p = await make_proxy(ROUTES, upstream_url=f"http://127.0.0.1:{up.port}",
                         upstream_timeout="2s")
    got, sent = await expect_exchange(port_of(p.url), "/exec/up", {}, b"q" * 1000)
    assert sent and got.status == 200
    assert b"expect" not in up.requests[-1].lower()


# --- 6. a live lease outlives the window ----------------------------------------------

async def test_a_retry_after_the_ttl_of_a_running_request_is_a_conflict(make_proxy,
                                                                        upstream, client):
    """ttl 1s, a request still running after it: the retry gets 409, never a second run;
    the first completes and its result is stored."""
    p = await make_proxy("""
        - name: gate
          match: {methods: [POST], path: "/gate/*"}
          ttl: 1s
          lock_timeout: 1s
    """)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/gate/long", key=key))
    while upstream.count("/gate/long") == 0:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # past the ttl and the first lease: the heartbeat renews it
    s, _, _ = await post(client, p.url + "/gate/long", key=key)
    assert s == 409 and upstream.count("/gate/long") == 1
    upstream.gate.set()
    s1, _, _ = await first
    assert s1 == 201 and upstream.count("/gate/long") == 1


def test_check_config_refuses_a_lease_longer_than_the_window():
    """lock_timeout > ttl is a config error naming the field."""
    from proxy.config import loads
    from proxy.errors import ConfigError
    with pytest.raises(ConfigError) as err:
        loads("routes:\n  - {name: a, match: {path: /a}, ttl: 30s}\n", env={})
    assert any(p.startswith("defaults.lock_timeout") or p.startswith("routes[0].lock_timeout")
               for p in err.value.problems), err.value.problems

