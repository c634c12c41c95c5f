"""Where a request came from, in both directions (issue #27's proxy hygiene).

Upstream: `X-Forwarded-For/-Proto/-Host` (and `Forwarded`) a client sends are replaced by
what the proxy saw, unless the client's address is in `trusted_proxies` (a load balancer
in front of the proxy): then they are appended to (For) or kept (Proto, Host). An app that
trusts `X-Forwarded-Proto: https` from anyone could otherwise be told that a plain-HTTP
request was secure.

Back to the client: the proxy sends the upstream its own `Host`, so an upstream that
builds absolute URLs (json-server, Django, Rails) answers `Location:
http://127.0.0.1:3000/orders/1`. A `Location` or `Content-Location` on the upstream's own
origin (and under its base path) is rewritten to the origin the client used, before the
answer is stored, so replays carry it too: nginx's `proxy_redirect default`.
`upstream.rewrite_location: false` turns it off.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config.values import parse_network
from proxy.http import headers as hdrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REWRITTEN = ("Location", "Content-Location")
# A Host (or X-Forwarded-Host) safe to put into a URL; anything else: a relative reference.
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True, slots=True)
class Forwarding:
    """One upstream's forwarding policy: whom to trust, whose URLs to rewrite."""

    trusted: tuple[Network, ...] = ()
    rewrite_location: bool = True
    prefixes: tuple[str, ...] = ()  # the upstream's origin + base path, lower-case

    @classmethod
    def build(cls, base: URL, *, trusted: Iterable[str] = (),
              rewrite_location: bool = True) -> Forwarding:
        return cls(tuple(parse_network(t) for t in trusted), rewrite_location,
                   _prefixes(base))

    def trusts(self, ip: str | None) -> bool:
        if not self.trusted or not ip:
            return False
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    def request_headers(self, request: web.BaseRequest, *, upstream_host: str
                        ) -> CIMultiDict[str]:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        ip = peer[0] if peer else None
        return hdrs.for_upstream(request.headers, client_ip=ip, scheme=request.scheme,
                                 upstream_host=upstream_host, trusted=self.trusts(ip))

    def response_headers(self, request: web.BaseRequest, headers: CIMultiDictProxy[str]
                         ) -> CIMultiDictProxy[str]:
        """`headers` with Location and Content-Location on the upstream's origin moved to
        the client's (the same object when there is nothing to rewrite)."""
        if not self.rewrite_location or not any(h in headers for h in _REWRITTEN):
            return headers
        out = CIMultiDict(headers)
        origin = self._client_origin(request)
        for name in _REWRITTEN:
            values = out.getall(name, ())
            if values:
                out.popall(name)
                for v in values:
                    out.add(name, self._rewrite(v, origin))
        return CIMultiDictProxy(out)

    def _rewrite(self, value: str, origin: str) -> str:
        low = value.lower()
        for prefix in self.prefixes:
            if low.startswith(prefix) and low[len(prefix):len(prefix) + 1] in ("", "/",
                                                                                "?", "#"):
                rest = value[len(prefix):]
                return origin + (rest if rest.startswith("/") else "/" + rest)
        return value

    def _client_origin(self, request: web.BaseRequest) -> str:
        """`scheme://host` the client used ('' when its Host is unfit for a URL: the
        rewritten value is then a relative reference, RFC 9110 §10.2.2)."""
        scheme, host = request.scheme, request.headers.get("Host", "")
        if self.trusted and self.trusts(_peer_ip(request)):
            scheme = _first(request.headers.get("X-Forwarded-Proto")) or scheme
            host = _first(request.headers.get("X-Forwarded-Host")) or host
        if scheme.lower() not in _SCHEMES or not _HOST.match(host):
            return ""
        return f"{scheme.lower()}://{host}"


def _peer_ip(request: web.BaseRequest) -> str | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return peer[0] if peer else None


def _first(value: str | None) -> str:
    """The first (the original client's) element of a comma-separated forwarded list."""
    return value.split(",", 1)[0].strip() if value else ""


def _prefixes(base: URL) -> tuple[str, ...]:
    """The spellings of the upstream's origin + base path a Location may use: with and
    without the scheme's default port."""
    scheme, host = (base.scheme or "").lower(), (base.raw_host or "").lower()
    if not host or scheme not in _SCHEMES:
        return ()
    if ":" in host:
        host = f"[{host}]"
    path = base.raw_path.rstrip("/").lower()
    port = base.explicit_port
    default = _DEFAULT_PORTS[scheme]
    ports = [port] if port not in (None, default) else [None, default]
    return tuple(f"{scheme}://{host}{'' if p is None else f':{p}'}{path}" for p in ports)
