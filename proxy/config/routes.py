"""Parse `routes` (with `defaults` and `preset`s merged in) into `Route` dataclasses."""

from __future__ import annotations

from typing import Any

from proxy.config.schema import (
    SAFE_METHODS, Concurrent, Fingerprint, KeySource, Route, StoreUnavailablePolicy, Tenant,
    TenantMode, UnknownOutcome,
)
from proxy.config.values import (
    Reader, bool_, enum_, parse_duration, parse_header_name, parse_size, str_,
)
from proxy.routing import PathPattern

ROUTE_FIELDS = {
    "name", "match", "key", "preset", "require_key", "tenant", "fingerprint", "ttl",
    "lock_timeout", "concurrent", "wait_timeout", "release_statuses", "unknown_outcome",
    "max_request_body", "max_stored_body", "store_unavailable", "replay_set_cookie",
    "replay_header", "expires_header",
}
DEFAULT_FIELDS = ROUTE_FIELDS - {"name", "match"}

# Webhook senders: the delivery id is the key, tenants do not apply (the sender signs,
# it does not authenticate with Authorization), retries change timestamp and signature
# headers but never the body, and the window covers the sender's retry horizon.
PRESETS: dict[str, dict[str, Any]] = {
    "github": {"key": {"header": "X-GitHub-Delivery"}, "ttl": "72h"},
    "shopify": {"key": {"header": "X-Shopify-Webhook-Id"}, "ttl": "72h"},
    "standard-webhooks": {"key": {"header": "webhook-id"}, "ttl": "96h"},
    "stripe": {"key": {"body": ["/id"]}, "ttl": "96h"},
}
_PRESET_COMMON: dict[str, Any] = {
    "tenant": "none", "require_key": True, "fingerprint": {"query": False, "body": True},
}


def parse_routes(r: Reader, raw: object, raw_defaults: object) -> tuple[Route, ...]:
    defaults = r.section(raw_defaults, "defaults", DEFAULT_FIELDS)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problems.append(f"routes: expected a list of routes, got {raw!r}")
        return ()
    routes: list[Route] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        data = r.section(item, path, ROUTE_FIELDS)
        preset = data.get("preset")
        merged = dict(defaults)
        if preset is not None:
            if preset not in PRESETS:
                r.problems.append(f"{path}.preset: {preset!r} is not one of: "
                                  f"{', '.join(PRESETS)}")
            else:
                merged.update(_PRESET_COMMON)
                merged.update(PRESETS[preset])
        merged.update(data)
        route = _parse_route(r, merged, path)
        if route is not None:
            if route.name in names:
                r.problems.append(f"{path}.name: {route.name!r} is used by an earlier route")
            names.add(route.name)
            routes.append(route)
    return tuple(routes)


def _parse_route(r: Reader, d: dict[str, Any], path: str) -> Route | None:
    name = r.get(d, "name", f"{path}.name", _name, "")
    if "name" not in d:
        r.problems.append(f"{path}.name: missing (every route needs a unique name)")
    match = r.section(d.get("match"), f"{path}.match", {"methods", "path"})
    if "path" not in match:
        r.problems.append(f"{path}.match.path: missing")
        return None
    pattern = r.get(match, "path", f"{path}.match.path", _pattern, None)
    if pattern is None:
        return None
    methods = r.get(match, "methods", f"{path}.match.methods", _methods, frozenset({"POST"}))
    key = _parse_key(r, d.get("key"), f"{path}.key", pattern)
    dflt = Route(name="", methods=frozenset(), path=pattern)
    expires = d.get("expires_header", dflt.expires_header)
    return Route(
        name=name, methods=methods, path=pattern, key=key,
        require_key=r.get(d, "require_key", f"{path}.require_key", bool_, dflt.require_key),
        tenant=_parse_tenant(r, d.get("tenant"), f"{path}.tenant"),
        fingerprint=_parse_fingerprint(r, d.get("fingerprint"), f"{path}.fingerprint"),
        ttl=r.get(d, "ttl", f"{path}.ttl", _positive(parse_duration), dflt.ttl),
        lock_timeout=r.get(d, "lock_timeout", f"{path}.lock_timeout",
                           _positive(parse_duration), dflt.lock_timeout),
        concurrent=r.get(d, "concurrent", f"{path}.concurrent", enum_(Concurrent),
                         dflt.concurrent),
        wait_timeout=r.get(d, "wait_timeout", f"{path}.wait_timeout", parse_duration,
                           dflt.wait_timeout),
        release_statuses=r.get(d, "release_statuses", f"{path}.release_statuses", _statuses,
                               dflt.release_statuses),
        unknown_outcome=r.get(d, "unknown_outcome", f"{path}.unknown_outcome",
                              enum_(UnknownOutcome), dflt.unknown_outcome),
        max_request_body=r.get(d, "max_request_body", f"{path}.max_request_body", parse_size,
                               dflt.max_request_body),
        max_stored_body=r.get(d, "max_stored_body", f"{path}.max_stored_body", parse_size,
                              dflt.max_stored_body),
        store_unavailable=r.get(d, "store_unavailable", f"{path}.store_unavailable",
                                enum_(StoreUnavailablePolicy), dflt.store_unavailable),
        replay_set_cookie=r.get(d, "replay_set_cookie", f"{path}.replay_set_cookie", bool_,
                                dflt.replay_set_cookie),
        replay_header=r.get(d, "replay_header", f"{path}.replay_header", parse_header_name,
                            dflt.replay_header),
        expires_header=None if expires in (None, False) else
        r.get(d, "expires_header", f"{path}.expires_header", parse_header_name,
              dflt.expires_header),
    )


def _parse_key(r: Reader, raw: object, path: str, pattern: PathPattern) -> KeySource:
    if raw is None:
        return KeySource()
    d = r.section(raw, path, {"header", "path", "body", "bucket"})
    given = [k for k in ("header", "path", "body") if k in d]
    if len(given) != 1:
        r.problems.append(f"{path}: set exactly one of header, path, body (got "
                          f"{', '.join(given) or 'none'})")
        return KeySource()
    if "bucket" in d and "body" not in d:
        r.problems.append(f"{path}.bucket: only applies to key.body")
    if "header" in d:
        return KeySource(header=r.get(d, "header", f"{path}.header", parse_header_name, None))
    if "path" in d:
        param = r.get(d, "path", f"{path}.path", str_, "")
        if param not in pattern.params:
            r.problems.append(f"{path}.path: {param!r} is not a parameter of "
                              f"{pattern.text!r} (has: {', '.join(pattern.params) or 'none'})")
        return KeySource(header=None, path=param)
    pointers = r.get(d, "body", f"{path}.body", _pointers, None) or ()
    return KeySource(header=None, body=pointers,
                     bucket=r.get(d, "bucket", f"{path}.bucket",
                                  _positive(parse_duration), None))


def _parse_tenant(r: Reader, raw: object, path: str) -> Tenant:
    if raw is None or raw == "authorization":
        return Tenant()
    if raw == "none":
        return Tenant(mode=TenantMode.NONE, header="")
    if isinstance(raw, dict):
        d = r.section(raw, path, {"header"})
        header = r.get(d, "header", f"{path}.header", parse_header_name, "")
        if header:
            return Tenant(mode=TenantMode.HEADER, header=header)
    r.problems.append(f"{path}: {raw!r} is not one of: authorization, none, {{header: NAME}}")
    return Tenant()


def _parse_fingerprint(r: Reader, raw: object, path: str) -> Fingerprint:
    d = r.section(raw, path, {"query", "body", "headers"})
    dflt = Fingerprint()
    headers = r.get(d, "headers", f"{path}.headers", _header_list, dflt.headers)
    return Fingerprint(query=r.get(d, "query", f"{path}.query", bool_, dflt.query),
                       body=r.get(d, "body", f"{path}.body", bool_, dflt.body),
                       headers=headers)


def _name(value: object) -> str:
    text = str_(value)
    if not text or len(text) > 100 or any(c in text for c in ":\x00\n"):
        raise ValueError(f"{value!r} is not a route name (1-100 characters, no ':')")
    return text


def _pattern(value: object) -> PathPattern:
    return PathPattern.compile(str_(value))


def _methods(value: object) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError(f"{value!r} is not a list of methods like [POST, PUT]")
    methods = frozenset(str(m).upper() for m in items)
    safe = sorted(methods & SAFE_METHODS)
    if safe:
        raise ValueError(f"{', '.join(safe)} {'is a safe method' if len(safe) == 1 else 'are safe methods'} "
                         "and never guarded")
    return methods


def _statuses(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in value):
        raise ValueError(f"{value!r} is not a list of HTTP statuses like [429, 503]")
    return frozenset(value)


def _pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{value!r} is not a list of JSON pointers like [/to, /template]")
    bad = [p for p in value if p and not p.startswith("/")]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a JSON pointer (RFC 6901: '' or starting with /)")
    return tuple(value)


def _header_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of header names")
    return tuple(parse_header_name(h) for h in value)


def _positive(parse: Any) -> Any:
    def check(value: object) -> float:
        result: float = parse(value)
        if result <= 0:
            raise ValueError(f"{value!r} must be more than zero")
        return result
    return check
