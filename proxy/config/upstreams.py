"""Parse `upstream`, the named `upstreams:` map and each route's `upstream` reference.

    upstream:            the default: every request no route sends elsewhere
      url: https://api.example.com
      tls: {ca_file: /etc/ca.pem, cert_file: ..., key_file: ..., server_name: ..., verify}
    upstreams:           named, each with the fields of `upstream` and the same defaults
      mail: {url: https://mail.internal, timeout: 10s}
    routes:
      - {name: send, match: {path: /v1/send}, upstream: mail}      # a name, or
      - {name: pay, match: {path: /v1/pay}, upstream: https://pay.internal}  # a URL

A route's URL gets the default upstream's timeouts and connection limit and default TLS
(the system's CAs, verified); anything else wants a named entry.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Any

from proxy.config.schema import Route, Upstream, UpstreamTLS
from proxy.config.values import Reader, bool_, int_in, parse_duration, str_

UPSTREAM_FIELDS = {"url", "connect_timeout", "timeout", "max_connections", "tls",
                   "rewrite_location"}
TLS_FIELDS = {"ca_file", "cert_file", "key_file", "server_name", "verify"}
_URL = re.compile(r"^https?://[^/\s?#]+(/[^\s?#]*)?$")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}$")


def upstream_url(value: object) -> str:
    text = str_(value).rstrip("/")
    if not _URL.match(text):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return text


def upstream_ref(value: object) -> str:
    """A route's `upstream`: a URL, or a name from `upstreams`."""
    text = str_(value)
    if "://" in text:
        return upstream_url(text)
    if not _NAME.match(text):
        raise ValueError(f"{value!r} is not an http(s):// URL or a name from upstreams "
                         "(letters, digits, _ . -)")
    return text


def parse_upstream(r: Reader, raw: object, path: str) -> Upstream:
    d, dflt = r.section(raw, path, UPSTREAM_FIELDS), Upstream()
    up = Upstream(
        url=r.get(d, "url", f"{path}.url", upstream_url, dflt.url),
        connect_timeout=r.get(d, "connect_timeout", f"{path}.connect_timeout",
                              parse_duration, dflt.connect_timeout),
        timeout=r.get(d, "timeout", f"{path}.timeout", parse_duration, dflt.timeout),
        max_connections=r.get(d, "max_connections", f"{path}.max_connections",
                              int_in(1, 100000), dflt.max_connections),
        tls=_parse_tls(r, d.get("tls"), f"{path}.tls"),
        rewrite_location=r.get(d, "rewrite_location", f"{path}.rewrite_location", bool_,
                               dflt.rewrite_location))
    if "tls" in d and not up.url.startswith("https:"):
        r.report(f"{path}.tls: only applies to an https:// url (url is {up.url!r})")
    return up


def _parse_tls(r: Reader, raw: object, path: str) -> UpstreamTLS:
    d, dflt = r.section(raw, path, TLS_FIELDS), UpstreamTLS()
    tls = UpstreamTLS(
        ca_file=r.get(d, "ca_file", f"{path}.ca_file", _readable, dflt.ca_file),
        cert_file=r.get(d, "cert_file", f"{path}.cert_file", _readable, dflt.cert_file),
        key_file=r.get(d, "key_file", f"{path}.key_file", _readable, dflt.key_file),
        server_name=r.get(d, "server_name", f"{path}.server_name", _host, dflt.server_name),
        verify=r.get(d, "verify", f"{path}.verify", bool_, dflt.verify))
    if tls.key_file and not tls.cert_file:
        r.report(f"{path}.key_file: needs cert_file (the client certificate it belongs to)")
    if not tls.verify and tls.ca_file:
        r.report(f"{path}.verify: false ignores ca_file; set one or the other")
    return tls


def parse_upstreams(r: Reader, raw: object) -> dict[str, Upstream]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        r.report(f"upstreams: expected a mapping of name: upstream, got {raw!r}")
        return {}
    out: dict[str, Upstream] = {}
    for name, item in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            r.report(f"upstreams.{name}: not a name (letters, digits, _ . -)")
            continue
        out[name] = parse_upstream(r, item, f"upstreams.{name}")
    return out


def resolve(r: Reader, routes: tuple[Route, ...], named: dict[str, Upstream],
            default: Upstream) -> dict[str, Upstream]:
    """`named` plus one entry per route URL; an unknown name is reported."""
    out = dict(named)
    for i, route in enumerate(routes):
        ref = route.upstream
        if not ref or ref in out:
            continue
        if "://" in ref:
            out[ref] = replace(default, url=ref, tls=UpstreamTLS())
        else:
            r.report(f"routes[{i}].upstream: {ref!r} is not a name from upstreams (has: "
                     f"{', '.join(sorted(named)) or 'none'})")
    return out


def check_tls(r: Reader, upstreams: dict[str, Any]) -> None:
    """Load every TLS context once, so check-config reports a bad PEM file."""
    from proxy.errors import ConfigError
    from proxy.upstream.tls import client_context

    for where, up in upstreams.items():
        if up.url.startswith("https:"):
            try:
                client_context(up.tls, where=where)
            except ConfigError as exc:
                for problem in exc.problems:
                    r.report(problem)


def _readable(value: object) -> str:
    text = str_(value)
    if text and not os.access(text, os.R_OK):
        raise ValueError(f"{text!r} is not a readable file")
    return text


def _host(value: object) -> str:
    text = str_(value)
    if text and not _HOST.match(text):
        raise ValueError(f"{value!r} is not a host name")
    return text
