"""Proxy hygiene (issue #27): Location and Content-Location on the upstream's origin are
rewritten to the client's before they are stored, and X-Forwarded-* are trusted only
from trusted_proxies (proxy/http/forwarded.py)."""

from __future__ import annotations

import uuid

import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import loads
from proxy.errors import ConfigError
from proxy.http.forwarded import Forwarding
from tests.conftest import serve_app
from tests.test_flow import post


def _rewrite(base: str, value: str, origin: str = "https://api.example") -> str:
    return Forwarding.build(URL(base))._rewrite(value, origin)


@pytest.mark.parametrize(("base", "value", "want"), [
    ("http://127.0.0.1:3000", "http://127.0.0.1:3000/orders/1", "https://api.example/orders/1"),
    ("http://127.0.0.1:3000", "HTTP://127.0.0.1:3000?x=1", "https://api.example/?x=1"),
    ("http://127.0.0.1:3000", "http://127.0.0.1:30001/x", "http://127.0.0.1:30001/x"),
    ("http://app", "http://app:80/a", "https://api.example/a"),
    ("http://app:80", "http://app/a", "https://api.example/a"),
    ("http://app/api", "http://app/api/orders/1", "https://api.example/orders/1"),
    ("http://app/api", "http://app/apix/1", "http://app/apix/1"),
    ("http://app/api", "http://app/other", "http://app/other"),
    ("https://app", "http://app/a", "http://app/a"),
    ("http://[::1]:3000", "http://[::1]:3000/a", "https://api.example/a"),
    ("http://app", "/relative/already", "/relative/already"),
    ("http://app", "https://elsewhere.example/a", "https://elsewhere.example/a"),
])
def test_location_rewriting(base, value, want):
    """Only the upstream's own origin (either spelling of a default port) under its base
    path is rewritten; other hosts, ports, schemes and relative references are kept."""
    assert _rewrite(base, value) == want


def test_an_unfit_client_host_gives_a_relative_reference():
    """A Host that is not a host name (or a scheme that is not http/https) never goes into
    the rewritten URL: the path alone is sent."""
    fwd = Forwarding.build(URL("http://app"))
    assert fwd._rewrite("http://app/a?b", "") == "/a?b"
    assert fwd.trusts("10.0.0.1") is False
    trusting = Forwarding.build(URL("http://app"), trusted=["10.0.0.0/8", "fd00::1"])
    assert trusting.trusts("10.2.3.4") and trusting.trusts("fd00::1")
    assert not trusting.trusts("11.0.0.1") and not trusting.trusts("not-an-ip")


def test_trusted_proxies_must_be_addresses_or_cidrs():
    """A trusted_proxies entry that is not an address or CIDR is a config error naming it."""
    with pytest.raises(ConfigError) as exc:
        loads("trusted_proxies: [10.0.0.0/8, lb.internal]\n", env={})
    assert "trusted_proxies: 'lb.internal' is not an IP address or CIDR" in str(exc.value)
    cfg = loads("trusted_proxies: [10.1.2.3/8]\nupstream: {rewrite_location: false}\n",
                env={})
    assert cfg.trusted_proxies == ("10.0.0.0/8",) and not cfg.upstream.rewrite_location


def _redirecting_app(seen: list[CIMultiDictProxy[str]]) -> web.Application:
    """An upstream that builds absolute URLs from the Host it was sent (as Django does)."""
    async def created(request: web.Request) -> web.Response:
        seen.append(request.headers)
        n = len(seen)
        base = f"http://{request.host}"
        return web.json_response({"n": n}, status=201, headers=CIMultiDict([
            ("Location", f"{base}/orders/{n}"), ("Content-Location", f"{base}/orders/{n}"),
            ("Link", f"<{base}/x>")]))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", created)
    return app


ROUTES = """
- name: orders
  match: {methods: [POST], path: "/orders"}
"""


async def test_location_is_rewritten_before_it_is_stored(make_proxy, client):
    """The first answer and its replay both carry the client's origin in Location and
    Content-Location; pass-through answers too; other headers are untouched."""
    seen: list[CIMultiDictProxy[str]] = []
    async with serve_app(_redirecting_app(seen)) as up:
        p = await make_proxy(ROUTES, upstream_url=up)
        key = uuid.uuid4().hex
        host = {"Host": "shop.example:8443"}
        for replayed in ("", "true"):
            s, h, _ = await post(client, p.url + "/orders", key=key, headers=host)
            assert s == 201 and h.get("Idempotent-Replayed", "") == replayed
            assert h["Location"] == h["Content-Location"] == "http://shop.example:8443/orders/1"
            assert h["Link"] == f"<{up}/x>"
        async with client.put(p.url + "/unrouted", headers=host) as r:
            assert r.headers["Location"] == "http://shop.example:8443/orders/2"


async def test_rewrite_location_false_leaves_it_alone(make_proxy, client):
    """upstream.rewrite_location: false: the upstream's Location is passed and stored as is."""
    seen: list[CIMultiDictProxy[str]] = []
    async with serve_app(_redirecting_app(seen)) as up:
        # config_for puts `extra` right under upstream's own fields
        p = await make_proxy(ROUTES, upstream_url=up, extra="  rewrite_location: false\n")
        assert not p.config.upstream.rewrite_location
        key = uuid.uuid4().hex
        for _ in range(2):
            s, h, _ = await post(client, p.url + "/orders", key=key)
            assert s == 201 and h["Location"] == up + "/orders/1"


async def test_forwarded_headers_are_trusted_only_from_trusted_proxies(make_proxy, client):
    """From a client outside trusted_proxies the upstream sees the proxy's own view; from
    a trusted one (127.0.0.1 here) the chain is appended to and the scheme kept."""
    seen: list[CIMultiDictProxy[str]] = []
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https",
             "X-Forwarded-Host": "bank.example"}
    async with serve_app(_redirecting_app(seen)) as up:
        plain = await make_proxy(ROUTES, upstream_url=up)
        trusting = await make_proxy(ROUTES, upstream_url=up,
                                    extra="trusted_proxies: [127.0.0.0/8]\n")
        for p in (plain, trusting):
            _, h, _ = await post(client, p.url + "/orders", key=uuid.uuid4().hex,
                                 headers=spoof)
        untrusted, trusted = seen
        assert (untrusted["X-Forwarded-For"], untrusted["X-Forwarded-Proto"]) == \
            ("127.0.0.1", "http")
        assert untrusted["X-Forwarded-Host"].startswith("127.0.0.1:")
        assert (trusted["X-Forwarded-For"], trusted["X-Forwarded-Proto"],
                trusted["X-Forwarded-Host"]) == ("6.6.6.6, 127.0.0.1", "https", "bank.example")
        assert h["Location"] == "https://bank.example/orders/2"  # the client's own origin
