"""`unknown_outcome: resend` (issue 32): an unknown outcome is re-sent at once with the
same upstream key, so an upstream that dedupes on it gives the client one definite
answer, with one effect; bounded attempts; refused without upstream_key."""

from __future__ import annotations

import json
import uuid

import pytest

from proxy.config import UnknownOutcome, loads
from proxy.errors import ConfigError
from proxy.flow.execute import RESEND_ATTEMPTS
from tests.test_flow import post
from tests.test_upstream_key_takeover import IdempotentUpstream, provider  # noqa: F401
from tests.upstream import TestUpstream

ROUTES = """
- name: charges
  match: {methods: [POST], path: "/v1/charges"}
  require_key: true
  upstream_key: {header: Idempotency-Key}
  unknown_outcome: resend
- name: resets
  match: {methods: [POST], path: "/reset/*"}
  require_key: true
  upstream_key: {header: Idempotency-Key}
  unknown_outcome: resend
"""


@pytest.mark.parametrize("then", ["reset", "stall"])
async def test_an_unknown_outcome_is_resent_and_answered_once(
        make_proxy, provider: IdempotentUpstream, client, then):  # noqa: F811
    """The upstream charges, then resets (or times out): the proxy re-sends the same
    upstream key at once, the provider answers from its table, and the client gets that
    one charge in the same call; a retry replays it. One effect."""
    p = await make_proxy(ROUTES, upstream_url=provider.url, upstream_timeout="1s")
    key = uuid.uuid4().hex
    url = p.url + f"/v1/charges?then={then}"
    s1, h1, body = await post(client, url, key=key)
    assert s1 == 201 and json.loads(body) == {"id": "ch_1"}
    assert "Idempotent-Replayed" not in h1
    s2, h2, body2 = await post(client, url, key=key)
    assert (s2, body2, h2["Idempotent-Replayed"]) == (201, body, "true")
    assert provider.effects == ["ch_1"]
    assert len(provider.keys_seen) == 2 and len(set(provider.keys_seen)) == 1


async def test_resends_are_bounded_then_the_claim_is_kept(make_proxy, upstream: TestUpstream,
                                                          client):
    """An upstream that resets every attempt gets 1 + RESEND_ATTEMPTS sends, then the
    client gets the 502 and the claim stays (a retry meanwhile is a 409, not a send)."""
    p = await make_proxy(ROUTES)
    key = uuid.uuid4().hex
    s1, _, _ = await post(client, p.url + "/reset/r1", key=key)
    assert s1 == 502
    assert upstream.count("/reset/r1") == 1 + RESEND_ATTEMPTS
    s2, _, _ = await post(client, p.url + "/reset/r1", key=key)
    assert s2 == 409 and upstream.count("/reset/r1") == 1 + RESEND_ATTEMPTS


def test_resend_without_upstream_key_is_refused_by_check_config():
    """unknown_outcome: resend needs upstream_key; with one it loads."""
    text = """
upstream: {url: "http://127.0.0.1:9"}
routes:
  - name: pay
    match: {path: /pay}
    unknown_outcome: resend
"""
    with pytest.raises(ConfigError, match="resend needs upstream_key"):
        loads(text, env={})
    ok = loads(text + "    upstream_key: {header: Idempotency-Key}\n", env={})
    assert ok.routes[0].unknown_outcome is UnknownOutcome.RESEND
