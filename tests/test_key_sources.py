"""Keys from the path and the body, fingerprint control, and the headers that tell the
client more (design §2-3, issue 5) — through a real proxy against real PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import aiohttp

from tests.upstream import TestUpstream, body_json

ROUTES = """
- name: orders-by-path
  match: {methods: [PUT], path: "/exec/orders/{order_id}"}
  key: {path: order_id}
  ttl: 7d
- name: emails-by-body
  match: {methods: [POST], path: /exec/emails}
  key: {body: [/to, /template], bucket: 1d}
  require_key: true
- name: emails-canonical
  match: {methods: [POST], path: /exec/canonical}
  key: {body: [/to, /template]}
  fingerprint: {canonical_json: true}
- name: emails-optional
  match: {methods: [POST], path: /exec/optional}
  key: {body: [/to]}
- name: ignoring
  match: {methods: [POST], path: "/exec/ignoring/*"}
  fingerprint: {ignore: [/timestamp, /meta/trace_id]}
- name: per-account
  match: {methods: [POST], path: "/exec/account/*"}
  fingerprint: {headers: [X-Account], query: false}
- name: renamed
  match: {methods: [POST], path: "/exec/renamed/*"}
  replay_header: X-Cache-Replay
  expires_header: Retry-Safe-Until
  ttl: 2h
- name: no-expiry
  match: {methods: [POST], path: "/exec/no-expiry/*"}
  expires_header: null
- name: plain
  match: {methods: [POST], path: "/exec/*"}
"""

Answer = tuple[int, dict[str, str], bytes]


async def send(client: aiohttp.ClientSession, url: str, *, method: str = "POST",
               data: bytes | str = b"", headers: dict[str, str] | None = None) -> Answer:
    async with client.request(method, url, data=data, headers=headers or {}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


JSON = {"Content-Type": "application/json"}


def unique() -> str:
    return uuid.uuid4().hex


# --- key.path ---------------------------------------------------------------------------

async def test_put_twice_without_any_key_header_runs_once(make_proxy, upstream, client):
    """`PUT /orders/42` twice with no key header: one execution, the second replayed."""
    p = await make_proxy(ROUTES)
    body = json.dumps({"sku": "A-1", "qty": 2})
    caller = {"Authorization": f"Bearer {unique()}"}  # a fresh tenant: a reused database
    s1, h1, b1 = await send(client, p.url + "/exec/orders/42", method="PUT", data=body,
                            headers=caller)           # may hold order 42 from a past run
    s2, h2, b2 = await send(client, p.url + "/exec/orders/42", method="PUT", data=body,
                            headers=caller)
    assert (s1, s2) == (201, 201) and b1 == b2
    assert upstream.count("/exec/orders/42") == 1
    assert "Idempotent-Replayed" not in h1 and h2["Idempotent-Replayed"] == "true"


async def test_each_path_parameter_is_its_own_key(make_proxy, upstream, client):
    """Another order id is another key; the same id with another body is a 422."""
    p = await make_proxy(ROUTES)
    order = unique()
    await send(client, p.url + f"/exec/orders/{order}", method="PUT", data=b'{"qty": 1}')
    await send(client, p.url + f"/exec/orders/{order}-b", method="PUT", data=b'{"qty": 1}')
    s, h, b = await send(client, p.url + f"/exec/orders/{order}", method="PUT",
                         data=b'{"qty": 9}')
    assert upstream.count("/exec/orders/") == 2
    assert s == 422 and body_json(b)["type"] == "https://idemproxy.dev/errors/key-reused"


async def test_path_key_ignores_an_idempotency_key_header(make_proxy, upstream, client):
    """On a path-keyed route the path decides: a changing header does not make new keys."""
    p = await make_proxy(ROUTES)
    url = p.url + f"/exec/orders/{unique()}"
    for _ in range(3):
        await send(client, url, method="PUT", data=b"{}",
                   headers={"Idempotency-Key": unique()})
    assert upstream.count("/exec/orders/") == 1


async def test_non_ascii_path_key_is_400(make_proxy, upstream, client):
    """A path parameter that is not printable ASCII is a malformed key: 400, not forwarded."""
    p = await make_proxy(ROUTES)
    s, h, b = await send(client, p.url + "/exec/orders/caf%C3%A9", method="PUT", data=b"{}")
    assert s == 400 and h["Content-Type"] == "application/problem+json"
    assert body_json(b)["type"] == "https://idemproxy.dev/errors/key-malformed"
    assert upstream.count() == 0


# --- key.body ---------------------------------------------------------------------------

async def test_same_content_without_any_key_runs_once_per_bucket(make_proxy, upstream,
                                                                  client):
    """Same recipient and template, no key header: one execution per day bucket."""
    p = await make_proxy(ROUTES)
    p.deps.db_clock_offset = 43200 - time.time() % 86400  # noon (UTC): no midnight mid-test
    mail = json.dumps({"to": f"{unique()}@example.com", "template": "welcome"})
    first = await send(client, p.url + "/exec/emails", data=mail, headers=JSON)
    again = await send(client, p.url + "/exec/emails", data=mail, headers=JSON)
    assert upstream.count("/exec/emails") == 1
    assert again[2] == first[2] and again[1]["Idempotent-Replayed"] == "true"
    p.deps.db_clock_offset += 86400  # the database's clock is now in the next day
    nextday = await send(client, p.url + "/exec/emails", data=mail, headers=JSON)
    assert upstream.count("/exec/emails") == 2
    assert nextday[0] == 201 and "Idempotent-Replayed" not in nextday[1]


async def test_another_recipient_is_another_body_key(make_proxy, upstream, client):
    """A different value at a selected pointer is a different key."""
    p = await make_proxy(ROUTES)
    for to in (unique(), unique()):
        mail = json.dumps({"to": to, "template": "welcome"})
        await send(client, p.url + "/exec/emails", data=mail, headers=JSON)
    assert upstream.count("/exec/emails") == 2


async def test_key_order_and_whitespace_map_to_one_key(make_proxy, upstream, client):
    """Two JSON bodies differing only in member order and whitespace: one key, one run."""
    p = await make_proxy(ROUTES)
    to = f"{unique()}@example.com"
    a = json.dumps({"to": to, "template": "receipt", "vars": {"n": 1, "total": "9.90"}})
    b = ('{\n  "vars": {"total": "9.90",  "n": 1.0},\n  "template" : "receipt",'
         f'\n  "to": "{to}"\n}}')
    s1, _, b1 = await send(client, p.url + "/exec/canonical", data=a, headers=JSON)
    s2, h2, b2 = await send(client, p.url + "/exec/canonical", data=b, headers=JSON)
    assert (s1, s2) == (201, 201) and b2 == b1 and h2["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/canonical") == 1


async def test_reordered_body_is_same_key_but_422_without_canonical_fingerprint(
        make_proxy, upstream, client):
    """Body keys are always canonical; the fingerprint is raw bytes unless canonical_json."""
    p = await make_proxy(ROUTES)
    to = unique()
    a = json.dumps({"to": to, "template": "t"})
    b = json.dumps({"template": "t", "to": to}, indent=2)
    await send(client, p.url + "/exec/emails", data=a, headers=JSON)
    s, _, body = await send(client, p.url + "/exec/emails", data=b, headers=JSON)
    assert s == 422 and body_json(body)["type"].endswith("/key-reused")  # same key, so 422
    assert upstream.count("/exec/emails") == 1


async def test_form_body_keys(make_proxy, upstream, client):
    """Form-encoded bodies key on field names: the same form twice runs once."""
    p = await make_proxy(ROUTES)
    form = f"to={unique()}%40example.com&template=welcome&note=hi"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    await send(client, p.url + "/exec/emails", data=form, headers=headers)
    s, h, _ = await send(client, p.url + "/exec/emails", data=form, headers=headers)
    assert s == 201 and h["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/emails") == 1


async def test_missing_pointer_on_require_key_route_is_400(make_proxy, upstream, client):
    """A selected field absent from the body of a require_key route: 400 naming it."""
    p = await make_proxy(ROUTES)
    mail = json.dumps({"to": unique()})
    s, h, b = await send(client, p.url + "/exec/emails", data=mail, headers=JSON)
    assert s == 400 and h["Content-Type"] == "application/problem+json"
    problem = body_json(b)
    assert problem["type"] == "https://idemproxy.dev/errors/key-missing"
    assert "no value at /template" in str(problem["detail"])
    assert upstream.count() == 0


async def test_body_that_is_not_json_or_form_is_a_clear_400(make_proxy, upstream, client):
    """Text, broken JSON, an empty body or absurd nesting on a body-keyed route: 400s
    that say why, never a 500, and nothing reaches the upstream."""
    p = await make_proxy(ROUTES)
    cases = [(b"hello", "text/plain", "not JSON or form-encoded"),
             (b'{"to": "x", "template": ', "application/json", "not JSON or form-encoded"),
             (b"", "application/json", "has no body"),
             (b"[" * 50_000 + b"]" * 50_000, "application/json", "nested too deeply"),
             (b"\x00\xff", "application/octet-stream", "application/octet-stream")]
    for data, ctype, why in cases:
        s, h, b = await send(client, p.url + "/exec/emails", data=data,
                             headers={"Content-Type": ctype})
        assert s == 400, (ctype, s, b)
        assert h["Content-Type"] == "application/problem+json"
        assert why in str(body_json(b)["detail"]), body_json(b)
    assert upstream.count() == 0


async def test_body_without_key_streams_through_without_require_key(make_proxy, upstream,
                                                                     client):
    """Without require_key, a body with no key is forwarded unguarded, every time."""
    p = await make_proxy(ROUTES)
    for data in (b"not json", b"not json", b'{"from": "x"}'):
        s, h, _ = await send(client, p.url + "/exec/optional", data=data)
        assert s == 201 and "Idempotent-Replayed" not in h and "Idempotency-Expires" not in h
    assert upstream.count("/exec/optional") == 3
    assert p.metric("idemproxy_requests_total", route="emails-optional",
                    outcome="pass_through") == 3


async def test_optional_body_key_still_guards_when_present(make_proxy, upstream, client):
    """Without require_key, a body that has the key is guarded like any other."""
    p = await make_proxy(ROUTES)
    mail = json.dumps({"to": unique()})
    for _ in range(2):
        await send(client, p.url + "/exec/optional", data=mail, headers=JSON)
    assert upstream.count("/exec/optional") == 1


async def test_upstream_gets_the_body_byte_for_byte(make_proxy, upstream, client):
    """Reading a body key does not change what is forwarded: same bytes upstream."""
    p = await make_proxy(ROUTES)
    raw = ('{ "template":"t" ,\n "to" : "' + unique() + '", "x": 1.50 }').encode()
    await send(client, p.url + "/exec/emails", data=raw, headers=JSON)
    assert upstream.executions[-1].body == raw


# --- fingerprint control ----------------------------------------------------------------

async def test_ignored_json_fields_do_not_make_a_retry_different(make_proxy, upstream,
                                                                  client):
    """Fields under `ignore` may change between retries; any other change is still a 422."""
    p = await make_proxy(ROUTES)
    key, url = unique(), p.url + "/exec/ignoring/pay"
    doc = {"amount": 100, "timestamp": 1700000000, "meta": {"trace_id": "t1", "v": 1}}
    await send(client, url, data=json.dumps(doc), headers={"Idempotency-Key": key})
    retry = {**doc, "timestamp": 1700000099, "meta": {"v": 1, "trace_id": "t2"}}
    s, h, _ = await send(client, url, data=json.dumps(retry, indent=1),
                         headers={"Idempotency-Key": key})
    assert s == 201 and h["Idempotent-Replayed"] == "true"
    changed = {**doc, "amount": 101}
    s, _, _ = await send(client, url, data=json.dumps(changed),
                         headers={"Idempotency-Key": key})
    assert s == 422
    assert upstream.count("/exec/ignoring/") == 1


async def test_named_headers_count_and_query_can_be_left_out(make_proxy, upstream, client):
    """`headers: [X-Account]` makes another account a 422; `query: false` ignores the query."""
    p = await make_proxy(ROUTES)
    key, url = unique(), p.url + "/exec/account/transfer"
    h1 = {"Idempotency-Key": key, "X-Account": "acct_1"}
    await send(client, url + "?trace=1", data=b"{}", headers=h1)
    s, h, _ = await send(client, url + "?trace=2", data=b"{}", headers=h1)
    assert s == 201 and h["Idempotent-Replayed"] == "true"
    s, _, _ = await send(client, url, data=b"{}", headers={**h1, "X-Account": "acct_2"})
    assert s == 422
    assert upstream.count("/exec/account/") == 1


# --- the answer tells more ----------------------------------------------------------------

def expiry(headers: dict[str, str], name: str = "Idempotency-Expires") -> datetime:
    value = headers[name]
    assert value.endswith(" GMT"), value  # an IMF-fixdate (RFC 9110 §5.6.7)
    return parsedate_to_datetime(value)


async def test_expires_is_an_http_date_on_first_and_replayed_answers(make_proxy, upstream,
                                                                      client):
    """Every guarded answer carries Idempotency-Expires: the window's end, as an HTTP-date."""
    p = await make_proxy(ROUTES)
    url = p.url + f"/exec/orders/{unique()}"
    before = datetime.now(UTC)
    _, h1, _ = await send(client, url, method="PUT", data=b"{}")
    _, h2, _ = await send(client, url, method="PUT", data=b"{}")
    first = expiry(h1)
    assert abs(first - (before + timedelta(days=7))) < timedelta(seconds=30)
    assert expiry(h2) == first and h2["Idempotent-Replayed"] == "true"


async def test_replay_and_expires_headers_can_be_renamed(make_proxy, upstream, client):
    """`replay_header` and `expires_header` rename both headers; the defaults are absent."""
    p = await make_proxy(ROUTES)
    url, key = p.url + "/exec/renamed/x", {"Idempotency-Key": unique()}
    _, h1, _ = await send(client, url, data=b"{}", headers=key)
    _, h2, _ = await send(client, url, data=b"{}", headers=key)
    assert "X-Cache-Replay" not in h1 and h2["X-Cache-Replay"] == "true"
    assert "Idempotent-Replayed" not in h2 and "Idempotency-Expires" not in h2
    end = expiry(h1, "Retry-Safe-Until")
    assert expiry(h2, "Retry-Safe-Until") == end
    assert abs(end.timestamp() - time.time() - 7200) < 30
    assert upstream.count("/exec/renamed/") == 1


async def test_expires_header_off(make_proxy, upstream, client):
    """`expires_header: null`: no expiry header, first or replayed; replays still marked."""
    p = await make_proxy(ROUTES)
    url, key = p.url + "/exec/no-expiry/x", {"Idempotency-Key": unique()}
    _, h1, _ = await send(client, url, data=b"{}", headers=key)
    _, h2, _ = await send(client, url, data=b"{}", headers=key)
    assert "Idempotency-Expires" not in h1 and "Idempotency-Expires" not in h2
    assert h2["Idempotent-Replayed"] == "true"


async def test_unguarded_answers_carry_no_expiry(make_proxy, upstream: TestUpstream, client):
    """Only guarded answers carry an expiry: a keyless request has no window."""
    p = await make_proxy(ROUTES)
    _, h, _ = await send(client, p.url + "/exec/plain", data=b"{}")
    assert "Idempotency-Expires" not in h
