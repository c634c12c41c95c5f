"""The retry hints SDKs read (issue #25): a 409 `key-in-flight` and a 503 say "retry"
(`Retry-After`, `x-should-retry: true`, `Stripe-Should-Retry: true`), a mismatch says
"do not" whatever its status (so does a retry refused for its age), and other answers
carry no hint."""

from __future__ import annotations

import asyncio

import pytest

from proxy import errors
from proxy.errors import (
    Draining,
    IdentityUnavailable,
    KeyInFlight,
    KeyReused,
    ProblemError,
    ProxyBusy,
    RetryTooOld,
    ServiceUnavailable,
)
from proxy.http.framing import problem_response
from tests.test_flow import new_key, post

ROUTES = """
- name: gate
  match: {methods: [POST], path: "/gate/*"}
- name: mismatch-409
  match: {methods: [POST], path: "/exec/m409/*"}
  mismatch_status: 409
- name: exec
  match: {methods: [POST], path: "/exec/*"}
"""
RETRY = {"Retry-After": "1", "x-should-retry": "true", "Stripe-Should-Retry": "true"}
DO_NOT = {"x-should-retry": "false", "Stripe-Should-Retry": "false"}


def _problems() -> list[type[ProblemError]]:
    found, todo = [], [ProblemError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _problems(), ids=lambda c: c.__name__)
def test_each_problem_carries_the_hint_its_meaning_calls_for(cls):
    """Retry hints on exactly the problems whose same request later will work (409 in
    flight, 503 store down, busy or draining), "do not" on a mismatch or a retry too old,
    none on the rest."""
    expected = {KeyInFlight: RETRY, ServiceUnavailable: RETRY, ProxyBusy: RETRY,
                Draining: RETRY, IdentityUnavailable: RETRY, KeyReused: DO_NOT,
                RetryTooOld: DO_NOT}.get(cls, {})
    problem = cls.__new__(cls)
    ProblemError.__init__(problem, "detail")
    headers = problem_response(problem).headers
    assert {k: headers[k] for k in (*errors.RETRY_HINTS, "Retry-After") if k in headers} \
        == expected


async def test_a_409_in_flight_says_retry(make_proxy, upstream, client):
    """A retry while the first runs gets 409 key-in-flight with Retry-After and both SDK
    retry hints set to true."""
    p = await make_proxy(ROUTES)
    key = new_key()
    first = asyncio.create_task(post(client, p.url + "/gate/a", key=key))
    async with asyncio.timeout(30):
        while upstream.count("/gate/a") == 0:
            await asyncio.sleep(0.02)
    status, headers, body = await post(client, p.url + "/gate/a", key=key)
    upstream.gate.set()
    assert (await first)[0] == 201
    assert status == 409 and b"key-in-flight" in body
    assert {k: headers.get(k) for k in RETRY} == RETRY


@pytest.mark.parametrize("path", ["/exec/m422/x", "/exec/m409/x"])
async def test_a_mismatch_says_do_not_retry(make_proxy, upstream, client, path):
    """The same key with another body: 422 (or the route's 409) with both SDK hints false
    and no Retry-After, so an SDK that retries 409 does not resend it."""
    p = await make_proxy(ROUTES)
    key = new_key()
    assert (await post(client, p.url + path, key=key, data=b'{"a": 1}'))[0] == 201
    status, headers, body = await post(client, p.url + path, key=key, data=b'{"a": 2}')
    assert status in (409, 422) and b"key-reused" in body
    assert {k: headers.get(k) for k in DO_NOT} == DO_NOT and "Retry-After" not in headers
