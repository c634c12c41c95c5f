"""Durations are bounded (issue 25): `ttl: 3000000d` passed check-config and every request
on its route then got a 503. Every duration field now refuses more than 5 years, naming the
field, and the longest accepted window works against real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest

from proxy.config.values import MAX_DURATION, parse_duration
from proxy.errors import StoreError
from proxy.store.postgres import PostgresStore
from tests.test_cli import cli
from tests.test_config import one_route, problems


def test_the_longest_duration_is_five_years():
    """1825d (and the same in hours) parses; a millisecond more, or an overflow, does not."""
    assert parse_duration("1825d") == MAX_DURATION == parse_duration("43800h")
    for text in ("1825d1ms", "1826d", "3000000d", "9" * 400 + "d"):
        with pytest.raises(ValueError, match="is longer than 1825d \\(5 years\\)"):
            parse_duration(text)


@pytest.mark.parametrize("field", ["ttl", "lock_timeout", "wait_timeout"])
def test_a_route_duration_past_the_bound_names_its_field(field):
    """A route's ttl, lock_timeout or wait_timeout past 5 years is an error at its path."""
    found = problems(one_route(f"{field}: 3000000d\n"))
    assert any(p.startswith(f"routes[0].{field}: '3000000d' is longer than 1825d")
               for p in found), found


@pytest.mark.parametrize("text,field", [
    ("defaults: {ttl: 3000000d}\nroutes:\n  - name: a\n    match: {path: /a}\n",
     "defaults.ttl"),
    ("routes:\n  - name: a\n    match: {path: /a}\n    key: {body: [/id], bucket: 9000d}\n",
     "routes[0].key.bucket"),
    ("sweep_interval: 3000000d\n", "sweep_interval"),
    ("client: {keepalive_timeout: 3000000d}\n", "client.keepalive_timeout"),
])
async def test_check_config_refuses_a_duration_past_the_bound(tmp_path, text, field):
    """`idemproxy check-config` exits 2 naming the field whose duration is too long."""
    bad = tmp_path / "long.yaml"
    bad.write_text("upstream: {url: 'http://127.0.0.1:9'}\n" + text)
    code, out, err = await cli("check-config", str(bad))
    assert code == 2 and f"{field}: " in err and "is longer than 1825d" in err, err
    assert "Traceback" not in err and "OK" not in out


async def test_the_longest_window_is_one_postgres_and_python_accept(store: PostgresStore):
    """A claim with ttl and lease at the bound is stored and read back; far past it (the
    reported 3000000d) the store cannot even answer, which is why the bound exists."""
    claim = await store.claim(scope="bounds", key=uuid.uuid4().hex, fingerprint=b"f" * 32,
                              token=uuid.uuid4(), lease=MAX_DURATION, ttl=MAX_DURATION)
    assert claim.record.expires_at.year >= 2030
    with pytest.raises(StoreError):
        await store.claim(scope="bounds", key=uuid.uuid4().hex, fingerprint=b"f" * 32,
                          token=uuid.uuid4(), lease=60, ttl=3_000_000 * 86400.0)
