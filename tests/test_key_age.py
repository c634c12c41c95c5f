"""Late retries refused by age (issue 32): Repeatability-First-Sent older than the
route's ttl, and UUIDv7 keys older than max_key_age, are refused and never run."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import replace
from email.utils import formatdate

import aiohttp
import pytest

from proxy.config import Route, loads
from proxy.errors import BadRequest, ConfigError, RetryTooOld
from proxy.keys import check_age
from proxy.keys.age import uuid7_time
from proxy.paths import PathPattern
from tests.upstream import TestUpstream

NOW = 1_800_000_000.0
ROUTE = Route(name="pay", methods=frozenset({"POST"}), path=PathPattern.compile("/pay"),
              ttl=3600.0)


def uuid7(at: float) -> str:
    """A UUIDv7 whose timestamp is `at` (seconds), the rest random."""
    ms = int(at * 1000)
    rand = uuid.uuid4().int
    value = (ms << 80) | (0x7 << 76) | ((rand >> 64) & 0xFFF) << 64 | (0b10 << 62) \
        | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def sent(at: float) -> dict[str, str]:
    return {"Repeatability-First-Sent": formatdate(at, usegmt=True)}


def test_first_sent_within_the_window_passes():
    """A request first sent less than ttl ago is let through."""
    check_age(ROUTE, key="k", headers=sent(NOW - 3599), now=NOW)


def test_first_sent_before_the_window_is_refused_412():
    """A request first sent longer ago than ttl is refused with 412 retry-too-old."""
    with pytest.raises(RetryTooOld) as exc:
        check_age(ROUTE, key="k", headers=sent(NOW - 3601), now=NOW)
    assert (exc.value.status, exc.value.slug, exc.value.retry) == (412, "retry-too-old", False)
    assert "Repeatability-First-Sent" in exc.value.detail


def test_stale_status_is_the_routes_choice():
    """routes[].stale_status replaces 412 on the refusal."""
    with pytest.raises(RetryTooOld) as exc:
        check_age(replace(ROUTE, stale_status=409), key="k", headers=sent(NOW - 7200),
                  now=NOW)
    assert exc.value.status == 409


@pytest.mark.parametrize("value", ["yesterday", "", "Sun, 06 Nov 1994 08:49:37",
                                   "Sun, 99 Nov 1994 08:49:37 GMT", "x" * 100])
def test_a_first_sent_that_is_not_an_http_date_is_a_400(value):
    """A Repeatability-First-Sent that is not an HTTP-date with a zone is a 400."""
    with pytest.raises(BadRequest):
        check_age(ROUTE, key="k", headers={"Repeatability-First-Sent": value}, now=NOW)


def test_two_first_sent_headers_are_a_400():
    """Two Repeatability-First-Sent lines are ambiguous: a 400."""
    from multidict import CIMultiDict
    headers = CIMultiDict([("Repeatability-First-Sent", formatdate(NOW, usegmt=True))] * 2)
    with pytest.raises(BadRequest):
        check_age(ROUTE, key="k", headers=headers, now=NOW)


def test_uuid7_time_reads_the_creation_millisecond():
    """A UUIDv7's first 48 bits are its creation time; other UUIDs and keys give None."""
    assert uuid7_time(uuid7(NOW + 0.25)) == NOW + 0.25
    assert uuid7_time(str(uuid.uuid4())) is None
    assert uuid7_time("order-42") is None
    assert uuid7_time(uuid7(NOW).replace("-", "")) is None
    assert uuid7_time(uuid7(NOW)[:-1] + "g") is None


def test_an_old_uuid7_key_is_refused_only_with_max_key_age():
    """A UUIDv7 key older than max_key_age is refused; without max_key_age it passes."""
    old = uuid7(NOW - 601)
    check_age(ROUTE, key=old, headers={}, now=NOW)
    bounded = replace(ROUTE, max_key_age=600.0)
    check_age(bounded, key=uuid7(NOW - 599), headers={}, now=NOW)
    check_age(bounded, key="not-a-uuid", headers={}, now=NOW)
    with pytest.raises(RetryTooOld) as exc:
        check_age(bounded, key=old, headers={}, now=NOW)
    assert exc.value.status == 412 and "UUIDv7" in exc.value.detail


def test_config_reads_max_key_age_and_stale_status():
    """max_key_age and stale_status load from YAML; a bad stale_status is refused."""
    text = """
upstream: {url: "http://127.0.0.1:9"}
routes:
  - name: pay
    match: {path: /pay}
    key: {header: Repeatability-Request-ID}
    max_key_age: 10m
    stale_status: 409
"""
    route = loads(text, env={}).routes[0]
    assert (route.max_key_age, route.stale_status, route.key.header) == \
        (600.0, 409, "Repeatability-Request-ID")
    assert loads(text.replace("    max_key_age: 10m\n", ""), env={}).routes[0].max_key_age \
        is None
    with pytest.raises(ConfigError, match="stale_status"):
        loads(text.replace("409", "500"), env={})


ROUTES = """
- name: oasis
  match: {methods: [POST], path: "/exec/oasis/*"}
  key: {header: Repeatability-Request-ID}
  ttl: 1h
  max_key_age: 30m
"""


async def test_a_stale_retry_never_reaches_the_upstream(make_proxy, upstream: TestUpstream,
                                                        client: aiohttp.ClientSession):
    """End to end: a fresh OASIS request runs once and replays; a stale retry of a new
    key, by First-Sent or by UUIDv7 age, gets 412 problem+json and never runs."""
    p = await make_proxy(ROUTES)
    auth = {"Authorization": f"Bearer {uuid.uuid4().hex}"}
    fresh = {**auth, "Repeatability-Request-ID": uuid7(time.time()), **sent(time.time())}
    for _ in range(2):
        async with client.post(p.url + "/exec/oasis/a", data=b"{}", headers=fresh) as r:
            assert r.status == 201
    assert upstream.count("/exec/oasis/a") == 1
    stale_sent = {**auth, "Repeatability-Request-ID": str(uuid.uuid4()),
                  **sent(time.time() - 2 * 3600)}
    stale_key = {**auth, "Repeatability-Request-ID": uuid7(time.time() - 3600)}
    for path, headers in (("/exec/oasis/b", stale_sent), ("/exec/oasis/c", stale_key)):
        async with client.post(p.url + path, data=b"{}", headers=headers) as r:
            doc = json.loads(await r.read())
            assert r.status == 412, doc
            assert r.headers["Content-Type"].startswith("application/problem+json")
            assert doc["type"].endswith("/retry-too-old")
        assert upstream.count(path) == 0
