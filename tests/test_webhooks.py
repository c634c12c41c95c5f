"""Webhook presets with deliveries shaped like the real senders' (design §3, issue 5):
a redelivered event reaches the receiver once, whatever changed in its headers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
from standardwebhooks import Webhook

from tests.upstream import body_json

ROUTES = """
- name: hooks-std
  match: {methods: [POST], path: /exec/hooks/std}
  preset: standard-webhooks
- name: hooks-github
  match: {methods: [POST], path: /exec/hooks/github}
  preset: github
- name: hooks-stripe
  match: {methods: [POST], path: /exec/hooks/stripe}
  preset: stripe
- name: hooks-shopify
  match: {methods: [POST], path: /exec/hooks/shopify}
  preset: shopify
"""

Answer = tuple[int, dict[str, str], bytes]


async def deliver(client: aiohttp.ClientSession, url: str, payload: str,
                  headers: dict[str, str]) -> Answer:
    async with client.post(url, data=payload.encode(),
                           headers={"Content-Type": "application/json", **headers}) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def assert_replayed(first: Answer, second: Answer) -> None:
    assert first[0] == second[0] == 201
    assert second[2] == first[2]
    assert "Idempotent-Replayed" not in first[1]
    assert second[1]["Idempotent-Replayed"] == "true"


# --- Standard Webhooks (Svix, Clerk, Resend, ...) -----------------------------------------

def standard_headers(wh: Webhook, msg_id: str, payload: str, at: datetime) -> dict[str, str]:
    """What a Standard Webhooks sender puts on one delivery attempt."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": wh.sign(msg_id, at, payload)}


async def test_standard_webhooks_retry_with_new_signature_runs_once(make_proxy, upstream,
                                                                     client):
    """A signed message retried with a new timestamp and signature: one run, the replay."""
    p = await make_proxy(ROUTES)
    wh = Webhook("whsec_" + base64.b64encode(os.urandom(24)).decode())
    msg_id = f"msg_{uuid.uuid4().hex}"
    payload = json.dumps({"type": "invoice.paid", "timestamp": "2026-01-01T00:00:00Z",
                          "data": {"invoice": "in_1", "amount": 4200}})
    now = datetime.now(UTC)
    attempt1 = standard_headers(wh, msg_id, payload, now)
    attempt2 = standard_headers(wh, msg_id, payload, now + timedelta(seconds=65))
    assert attempt1["webhook-signature"] != attempt2["webhook-signature"]
    wh.verify(payload, attempt2)  # the retry is a genuine, valid delivery
    first = await deliver(client, p.url + "/exec/hooks/std", payload, attempt1)
    second = await deliver(client, p.url + "/exec/hooks/std", payload, attempt2)
    assert_replayed(first, second)
    assert upstream.count("/exec/hooks/std") == 1
    received = upstream.executions[0]  # forwarded intact: the receiver can still verify it
    assert wh.verify(received.body, received.headers)["data"]["amount"] == 4200


async def test_standard_webhooks_new_message_id_runs_again(make_proxy, upstream, client):
    """Another webhook-id is another event, even with an identical body."""
    p = await make_proxy(ROUTES)
    wh = Webhook(base64.b64encode(b"k" * 24).decode())
    payload = json.dumps({"type": "user.created", "data": {"id": "u1"}})
    now = datetime.now(UTC)
    for msg_id in (f"msg_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"):
        s, _, _ = await deliver(client, p.url + "/exec/hooks/std", payload,
                                standard_headers(wh, msg_id, payload, now))
        assert s == 201
    assert upstream.count("/exec/hooks/std") == 2


# --- GitHub -------------------------------------------------------------------------------

def github_headers(delivery: str, payload: str, secret: bytes) -> dict[str, str]:
    sig = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
    return {"X-GitHub-Delivery": delivery, "X-GitHub-Event": "issues",
            "X-GitHub-Hook-ID": "292430182", "X-Hub-Signature-256": f"sha256={sig}",
            "User-Agent": "GitHub-Hookshot/044aadd"}


async def test_github_redelivery_runs_once(make_proxy, upstream, client):
    """A delivery redelivered (same X-GitHub-Delivery, same body): one run, the replay."""
    p = await make_proxy(ROUTES)
    payload = json.dumps({"action": "opened", "issue": {"number": 1347},
                          "repository": {"full_name": "octocat/Hello-World"}})
    headers = github_headers(str(uuid.uuid4()), payload, b"s3cret")
    first = await deliver(client, p.url + "/exec/hooks/github", payload, headers)
    second = await deliver(client, p.url + "/exec/hooks/github?redelivery=1", payload,
                           headers)
    assert_replayed(first, second)
    assert upstream.count("/exec/hooks/github") == 1


async def test_github_delivery_without_its_id_is_400(make_proxy, upstream, client):
    """The preset requires the delivery id: a request without one is refused, not run."""
    p = await make_proxy(ROUTES)
    payload = json.dumps({"zen": "Design for failure."})
    headers = github_headers("x", payload, b"s3cret")
    del headers["X-GitHub-Delivery"]
    s, h, b = await deliver(client, p.url + "/exec/hooks/github", payload, headers)
    assert s == 400 and body_json(b)["type"] == "https://idemproxy.dev/errors/key-missing"
    assert "X-GitHub-Delivery" in str(body_json(b)["detail"])
    assert upstream.count() == 0


async def test_github_same_delivery_other_body_is_422(make_proxy, upstream, client):
    """The fingerprint is the body: one delivery id with another payload is a 422."""
    p = await make_proxy(ROUTES)
    delivery = str(uuid.uuid4())
    for n in (1, 2):
        payload = json.dumps({"action": "opened", "issue": {"number": n}})
        status, _, _ = await deliver(client, p.url + "/exec/hooks/github", payload,
                                     github_headers(delivery, payload, b"s3cret"))
    assert status == 422
    assert upstream.count("/exec/hooks/github") == 1


# --- Stripe -------------------------------------------------------------------------------

def stripe_event(event_id: str, *, pending_webhooks: int) -> str:
    """A Stripe event as Stripe sends it (pretty-printed JSON)."""
    return json.dumps({
        "id": event_id, "object": "event", "api_version": "2024-06-20",
        "created": 1717000000, "livemode": False, "pending_webhooks": pending_webhooks,
        "request": {"id": "req_abc", "idempotency_key": "k-1"},
        "type": "payment_intent.succeeded",
        "data": {"object": {"id": "pi_3Mtw", "object": "payment_intent", "amount": 2000,
                            "currency": "usd", "status": "succeeded"}},
    }, indent=2)


def stripe_signature(payload: str, at: int, secret: bytes = b"whsec_test") -> str:
    sig = hmac.new(secret, f"{at}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={at},v1={sig}"


async def test_stripe_event_delivered_twice_runs_once(make_proxy, upstream, client):
    """A Stripe event redelivered (new Stripe-Signature, pending_webhooks counting down):
    one run and the replay; the key is the event id itself."""
    p = await make_proxy(ROUTES)
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    first_payload = stripe_event(event_id, pending_webhooks=2)
    retry_payload = stripe_event(event_id, pending_webhooks=1)
    first = await deliver(client, p.url + "/exec/hooks/stripe", first_payload,
                          {"Stripe-Signature": stripe_signature(first_payload, 1717000001)})
    second = await deliver(client, p.url + "/exec/hooks/stripe", retry_payload,
                           {"Stripe-Signature": stripe_signature(retry_payload, 1717003601)})
    assert_replayed(first, second)
    assert upstream.count("/exec/hooks/stripe") == 1
    async with client.get(p.admin_url + "/admin/keys",
                          params={"scope": "hooks-stripe:-", "key": event_id}) as resp:
        assert resp.status == 200
        assert (await resp.json())["key"] == event_id


async def test_stripe_event_changed_beyond_pending_webhooks_is_422(make_proxy, upstream,
                                                                    client):
    """Only pending_webhooks is ignored: an event id reused for other data is a 422."""
    p = await make_proxy(ROUTES)
    event_id = f"evt_{uuid.uuid4().hex[:24]}"
    payload = stripe_event(event_id, pending_webhooks=1)
    await deliver(client, p.url + "/exec/hooks/stripe", payload, {})
    changed = payload.replace('"amount": 2000', '"amount": 2001')
    assert changed != payload
    s, _, _ = await deliver(client, p.url + "/exec/hooks/stripe", changed, {})
    assert s == 422
    assert upstream.count("/exec/hooks/stripe") == 1


async def test_stripe_body_without_an_event_id_is_400(make_proxy, upstream, client):
    """A body that is not a Stripe event (no /id) is refused with a reason, not run."""
    p = await make_proxy(ROUTES)
    s, _, b = await deliver(client, p.url + "/exec/hooks/stripe", '{"object": "event"}', {})
    assert s == 400 and "no value at /id" in str(body_json(b)["detail"])
    s, _, b = await deliver(client, p.url + "/exec/hooks/stripe", '{"id": {"x": 1}}', {})
    assert s == 400 and body_json(b)["type"].endswith("/key-malformed")
    assert upstream.count() == 0


# --- Shopify ------------------------------------------------------------------------------

async def test_shopify_retry_runs_once(make_proxy, upstream, client):
    """A Shopify webhook retried with the same X-Shopify-Webhook-Id: one run, the replay."""
    p = await make_proxy(ROUTES)
    payload = json.dumps({"id": 820982911946154508, "email": "jon@example.com",
                          "total_price": "199.00"})
    digest = hmac.new(b"shpss", payload.encode(), hashlib.sha256).digest()
    headers = {"X-Shopify-Webhook-Id": str(uuid.uuid4()), "X-Shopify-Topic": "orders/create",
               "X-Shopify-Hmac-Sha256": base64.b64encode(digest).decode(),
               "X-Shopify-Shop-Domain": "example.myshopify.com"}
    first = await deliver(client, p.url + "/exec/hooks/shopify", payload, headers)
    second = await deliver(client, p.url + "/exec/hooks/shopify", payload,
                           {**headers, "X-Shopify-Triggered-At": "2026-01-01T00:00:05Z"})
    assert_replayed(first, second)
    assert upstream.count("/exec/hooks/shopify") == 1
