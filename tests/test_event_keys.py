"""Keys from several headers (`key.headers`, with `key.body` as the structured-mode
fallback) and the event-push presets `cloudevents`, `sns` and `pubsub-push`, with
deliveries shaped like their senders' public samples, against real PostgreSQL."""

from __future__ import annotations

import copy
import hashlib
import json
import textwrap
import uuid

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy import keys
from proxy.config import loads
from proxy.errors import ConfigError, KeyMalformed, KeyMissing
from proxy.keys.composite import join
from tests.upstream import body_json


def keyed(data: bytes) -> str:
    return hashlib.sha256(b"secret" + data).hexdigest()


def route_of(fields: str):
    text = "routes:\n  - name: r\n    match: {path: /r}\n" + textwrap.indent(
        textwrap.dedent(fields), "    ")
    return loads(text, env={}).routes[0]


def key_of(route, headers: dict[str, str], body: bytes | None = None) -> str | None:
    return keys.read_key(route, headers=CIMultiDict(headers), params={}, body=body, now=0,
                         keyed=keyed)


# --- the key, pure ---------------------------------------------------------------------

def test_values_are_length_prefixed_so_a_separator_cannot_shift_them():
    """`a|b` + `c` and `a` + `b|c` are two keys; so are `ab` + `c` and `a` + `bc`."""
    route = route_of("key: {headers: [X-A, X-B]}\n")
    k1 = key_of(route, {"X-A": "a|b", "X-B": "c"})
    k2 = key_of(route, {"X-A": "a", "X-B": "b|c"})
    assert k1 == "3:a|b1:c" and k2 == "1:a3:b|c"
    assert key_of(route, {"X-A": "ab", "X-B": "c"}) != key_of(route, {"X-A": "a", "X-B": "bc"})


def test_a_long_or_non_ascii_composite_is_hashed_not_refused():
    """Over 255 characters, or not printable ASCII, the key is `multi:` + an HMAC."""
    long = join(["s" * 300, "1"], keyed=keyed)
    assert long.startswith("multi:") and len(long) < 255
    assert join(["/ctx", "é"], keyed=keyed).startswith("multi:")
    assert join(["s" * 300, "1"], keyed=keyed) != join(["s" * 300, "2"], keyed=keyed)


def test_no_header_is_no_key_and_half_the_headers_is_a_400():
    """None of the headers: unguarded (or 400 with require_key); some of them: 400."""
    route = route_of("key: {headers: [X-A, X-B]}\n")
    assert key_of(route, {}) is None
    with pytest.raises(KeyMalformed, match="only some of them"):
        key_of(route, {"X-A": "a"})
    with pytest.raises(KeyMissing, match="X-A, X-B"):
        key_of(route_of("key: {headers: [X-A, X-B]}\nrequire_key: true\n"), {})
    with pytest.raises(KeyMalformed, match="2 X-A headers"):
        key_of(route, CIMultiDict([("X-A", "1"), ("X-A", "2"), ("X-B", "3")]))


def test_the_body_fallback_gives_the_same_key_as_the_headers():
    """`headers` with `body`: a structured event's /source and /id make the binary key."""
    route = route_of("key: {headers: [ce-source, ce-id], body: [/source, /id]}\n")
    from_headers = key_of(route, {"ce-source": "/ctx", "ce-id": "A234"}, b"{}")
    from_body = key_of(route, {}, json.dumps({"source": "/ctx", "id": "A234"}).encode())
    assert from_headers == from_body == "4:/ctx4:A234"
    with pytest.raises(KeyMalformed, match="/id is not a non-empty string"):
        key_of(route, {}, json.dumps({"source": "/ctx", "id": {"x": 1}}).encode())


@pytest.mark.parametrize(("fields", "problem"), [
    ("key: {headers: []}", "routes[0].key.headers: [] is not a list of 1-8 header names"),
    ("key: {headers: [X-A, x-a]}", "routes[0].key.headers: ['X-A', 'x-a'] names a header "
     "twice"),
    ("key: {headers: ['X A']}", "routes[0].key.headers: 'X A' is not an HTTP header name"),
    ("key: {headers: [X-A], header: X-B}", "routes[0].key: set exactly one of header, path, "
     "body (got header, headers); or headers, alone or with body"),
    ("key: {headers: [X-A, X-B], body: [/a]}", "routes[0].key.body: with key.headers, one "
     "pointer per header, in the same order (got 1 for 2 headers)"),
    ("key: {headers: [X-A], body: [/a], raw: true}", "routes[0].key.raw: does not apply "
     "with key.headers"),
])
def test_bad_multi_header_keys_name_the_field(fields, problem):
    """check-config refuses empty, duplicate or mismatched header lists, naming the field."""
    text = "routes:\n  - name: r\n    match: {path: /r}\n    " + fields + "\n"
    with pytest.raises(ConfigError) as info:
        loads(text, env={})
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(("preset", "ttl", "key_headers", "key_body"), [
    ("cloudevents", 7 * 86400, ("ce-source", "ce-id"), ("/source", "/id")),
    ("sns", 86400, ("x-amz-sns-topic-arn", "x-amz-sns-message-id"), ()),
    ("pubsub-push", 7 * 86400, (), ("/subscription", "/message/messageId")),
])
def test_event_presets_set_the_sender_window_and_no_tenant(preset, ttl, key_headers,
                                                          key_body):
    """Each preset: its sender's key, its retry window, tenant none, a key required."""
    route = route_of(f"preset: {preset}\n")
    assert (route.ttl, route.key.headers, route.key.body) == (ttl, key_headers, key_body)
    assert route.tenant.mode.value == "none" and route.require_key
    assert not route.fingerprint.query and route.fingerprint.body


# --- the senders' envelopes, through the proxy --------------------------------------------

ROUTES = """
- name: ce
  match: {methods: [POST], path: /exec/ce}
  preset: cloudevents
- name: sns
  match: {methods: [POST], path: /exec/sns}
  preset: sns
- name: pubsub
  match: {methods: [POST], path: /exec/pubsub}
  preset: pubsub-push
- name: pair
  match: {methods: [POST], path: "/exec/pair/*"}
  key: {headers: [X-A, X-B]}
"""

Answer = tuple[int, dict[str, str], bytes]


async def deliver(url: str, body: bytes, headers: dict[str, str]) -> Answer:
    """One delivery as a sender makes it: no Authorization, its own headers."""
    async with aiohttp.ClientSession(auto_decompress=False) as session, \
            session.post(url, data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def assert_replayed(first: Answer, second: Answer) -> None:
    assert first[0] == second[0] == 201, (first, second)
    assert second[2] == first[2] and "Idempotent-Replayed" not in first[1]
    assert second[1]["Idempotent-Replayed"] == "true"


def ce_binary(event_id: str, source: str = "/mycontext/subcontext") -> dict[str, str]:
    """The CloudEvents HTTP binding's binary-mode example (spec v1.0.2, §3.1.4)."""
    return {"ce-specversion": "1.0", "ce-type": "com.example.someevent",
            "ce-time": "2018-04-05T03:56:24Z", "ce-id": event_id, "ce-source": source,
            "Content-Type": "application/json; charset=utf-8"}


async def test_cloudevents_binary_mode_redelivery_runs_once(make_proxy, upstream):
    """A binary-mode event redelivered is replayed; another id or source runs."""
    p = await make_proxy(ROUTES)
    eid = f"1234-1234-{uuid.uuid4().hex[:4]}"
    data = b'{"orderId": 42}'
    first = await deliver(p.url + "/exec/ce", data, ce_binary(eid))
    again = await deliver(p.url + "/exec/ce", data, ce_binary(eid))
    assert_replayed(first, again)
    other_source = await deliver(p.url + "/exec/ce", data, ce_binary(eid, "/other"))
    other_id = await deliver(p.url + "/exec/ce", data, ce_binary(eid + "-2"))
    assert body_json(other_source[2])["n"] == 2 and body_json(other_id[2])["n"] == 3
    assert upstream.count("/exec/ce") == 3


async def test_cloudevents_structured_mode_redelivery_runs_once(make_proxy, upstream):
    """A structured-mode event (application/cloudevents+json) is keyed by its source + id."""
    p = await make_proxy(ROUTES)
    event = {"specversion": "1.0", "type": "com.example.someevent",
             "time": "2018-04-05T03:56:24Z", "id": f"A234-{uuid.uuid4().hex[:6]}",
             "source": "/mycontext/subcontext",
             "datacontenttype": "application/json; charset=utf-8",
             "data": {"orderId": 42}}
    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    body = json.dumps(event).encode()
    first = await deliver(p.url + "/exec/ce", body, headers)
    again = await deliver(p.url + "/exec/ce", body, headers)
    assert_replayed(first, again)
    assert upstream.count("/exec/ce") == 1


async def test_cloudevents_with_half_the_headers_is_a_400(make_proxy, upstream):
    """ce-id without ce-source names half an event: 400 problem+json, nothing forwarded."""
    p = await make_proxy(ROUTES)
    headers = ce_binary("x-1")
    del headers["ce-source"]
    status, h, body = await deliver(p.url + "/exec/ce", b"{}", headers)
    assert status == 400 and h["Content-Type"] == "application/problem+json"
    assert body_json(body)["type"].endswith("/key-malformed")
    assert upstream.count("/exec/ce") == 0


def sns_delivery(message_id: str, subject: str = "My First Message"
                 ) -> tuple[bytes, dict[str, str]]:
    """An SNS HTTP/S notification as in AWS's documentation (sns-http-https-endpoint-as-
    subscriber, "HTTP/HTTPS notification JSON format")."""
    topic = "arn:aws:sns:us-west-2:123456789012:MyTopic"
    sub = topic + ":c9135db0-26c4-47ec-8998-413945fb5a96"
    body = {"Type": "Notification", "MessageId": message_id, "TopicArn": topic,
            "Subject": subject, "Message": "Hello world!",
            "Timestamp": "2012-05-02T00:54:06.655Z", "SignatureVersion": "1",
            "Signature": "EXAMPLEw6JRN...",
            "SigningCertURL": "https://sns.us-west-2.amazonaws.com/SimpleNotificationService"
                              "-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
            "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&"
                              f"SubscriptionArn={sub}"}
    headers = {"x-amz-sns-message-type": "Notification", "x-amz-sns-message-id": message_id,
               "x-amz-sns-topic-arn": topic, "x-amz-sns-subscription-arn": sub,
               "Content-Type": "text/plain; charset=UTF-8",
               "User-Agent": "Amazon Simple Notification Service Agent"}
    return json.dumps(body, indent=2).encode(), headers


async def test_sns_redelivery_runs_once(make_proxy, upstream):
    """An SNS notification redelivered is replayed; a new MessageId runs."""
    p = await make_proxy(ROUTES)
    mid = str(uuid.uuid4())
    body, headers = sns_delivery(mid)
    first = await deliver(p.url + "/exec/sns", body, headers)
    again = await deliver(p.url + "/exec/sns", body, headers)
    assert_replayed(first, again)
    body2, headers2 = sns_delivery(str(uuid.uuid4()))
    other = await deliver(p.url + "/exec/sns", body2, headers2)
    assert body_json(other[2])["n"] == 2 and upstream.count("/exec/sns") == 2


PUBSUB = {  # the wrapped push request in Google's Pub/Sub documentation ("Receive messages")
    "message": {
        "attributes": {"key": "value"},
        "data": "SGVsbG8gQ2xvdWQgUHViL1N1YiEgSGVyZSBpcyBteSBtZXNzYWdlIQ==",
        "messageId": "2070443601311540",
        "message_id": "2070443601311540",
        "publishTime": "2021-02-26T19:13:55.749Z",
        "publish_time": "2021-02-26T19:13:55.749Z",
    },
    "subscription": "projects/myproject/subscriptions/mysubscription",
}


def pubsub_delivery(message_id: str, attempt: int | None = None) -> bytes:
    doc = copy.deepcopy(PUBSUB)
    doc["message"]["messageId"] = doc["message"]["message_id"] = message_id
    if attempt is not None:  # with a dead-letter policy, each redelivery counts up
        doc["deliveryAttempt"] = attempt
    return json.dumps(doc).encode()


async def test_pubsub_push_redelivery_runs_once(make_proxy, upstream):
    """A push redelivered (deliveryAttempt 1 then 2) is replayed, not a 422; another
    messageId, or the same one on another subscription, runs."""
    p = await make_proxy(ROUTES)
    mid = str(uuid.uuid4().int)[:16]
    headers = {"Content-Type": "application/json"}
    first = await deliver(p.url + "/exec/pubsub", pubsub_delivery(mid, 1), headers)
    again = await deliver(p.url + "/exec/pubsub", pubsub_delivery(mid, 2), headers)
    assert_replayed(first, again)
    other = json.loads(pubsub_delivery(mid))
    other["subscription"] = "projects/myproject/subscriptions/another"
    elsewhere = await deliver(p.url + "/exec/pubsub", json.dumps(other).encode(), headers)
    new = await deliver(p.url + "/exec/pubsub", pubsub_delivery(mid + "1"), headers)
    assert (elsewhere[0], new[0]) == (201, 201)
    assert upstream.count("/exec/pubsub") == 3


async def test_pubsub_push_without_a_message_id_is_a_400(make_proxy, upstream):
    """A body with no /message/messageId is a 400 key-missing saying why."""
    p = await make_proxy(ROUTES)
    status, _, body = await deliver(p.url + "/exec/pubsub", b'{"message": {}}',
                                    {"Content-Type": "application/json"})
    assert status == 400 and "/message/messageId" in body_json(body)["detail"]
    assert upstream.count("/exec/pubsub") == 0


async def test_shifted_separators_are_two_executions_through_the_proxy(make_proxy, upstream,
                                                                      client):
    """`a|b` + `c` and `a` + `b|c` in two headers are two keys: both run."""
    p = await make_proxy(ROUTES)
    tag = uuid.uuid4().hex[:8]
    for a, b in ((f"{tag}|b", "c"), (tag, "b|c"), (f"{tag}|b", "c")):
        async with client.post(p.url + "/exec/pair/x", data=b"{}",
                               headers={"X-A": a, "X-B": b}) as resp:
            assert resp.status == 201
    assert upstream.count("/exec/pair/x") == 2
