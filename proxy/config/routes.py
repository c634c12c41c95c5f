"""Parse `routes` (with `defaults` and `preset`s merged in) into `Route` dataclasses.

A route's fields come from three layers, later ones winning: `defaults`, the route's
`preset`, the route itself. `key` and `tenant` replace as a whole; `fingerprint` merges
field by field. Every problem names the layer it came from, so a bad `defaults.ttl` is
reported once, as `defaults.ttl`, whether there are no routes or twenty.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config.schema import (
    SAFE_METHODS,
    Concurrent,
    Fingerprint,
    KeySource,
    MissingCredential,
    Route,
    StoreUnavailablePolicy,
    Tenant,
    TenantMode,
    TrailingSlash,
    UnknownOutcome,
    UpstreamKey,
)
from proxy.config.upstreams import upstream_ref
from proxy.config.values import (
    Reader,
    bool_,
    enum_,
    format_duration,
    parse_duration,
    parse_header_name,
    parse_size,
    str_,
)
from proxy.paths import PathPattern

ROUTE_FIELDS = {
    "name", "match", "key", "preset", "require_key", "tenant", "fingerprint", "ttl",
    "lock_timeout", "concurrent", "wait_timeout", "release_statuses", "unknown_outcome",
    "max_request_body", "max_stored_body", "store_unavailable", "replay_set_cookie",
    "replay_header", "expires_header", "mismatch_status", "upstream", "upstream_key",
}
DEFAULT_FIELDS = ROUTE_FIELDS - {"name", "match", "preset"}
KEY_FIELDS = {"header", "path", "body", "bucket", "raw"}
FINGERPRINT_FIELDS = {"query", "body", "headers", "ignore", "canonical_json"}

# Webhook senders: the delivery id is the key; tenants do not apply (the sender signs, it
# does not authenticate with Authorization); retries change the timestamp and signature
# headers but not the body, so only the body counts. 96h covers every sender's horizon
# with a day to spare: Stripe retries for 3 days, GitHub redelivers for 3 days, Standard
# Webhooks (Svix) retries for ~28h plus manual replays, Shopify for 4h (48h formerly).
PRESETS: dict[str, dict[str, Any]] = {
    "github": {"key": {"header": "X-GitHub-Delivery"}},
    "shopify": {"key": {"header": "X-Shopify-Webhook-Id"}},
    "standard-webhooks": {"key": {"header": "webhook-id"}},
    # The event id is already a printable, bounded, unique id: the key is the id itself,
    # so `idemproxy keys show` finds the evt_... an operator sees in Stripe's dashboard.
    # `pending_webhooks` counts the endpoints still waiting, so it can differ between
    # two deliveries of one event: it must not make a retry a 422.
    "stripe": {"key": {"body": ["/id"], "raw": True},
               "fingerprint": {"canonical_json": True, "ignore": ["/pending_webhooks"]}},
}
_PRESET_COMMON: dict[str, Any] = {
    "tenant": "none", "require_key": True, "ttl": "96h",
    "fingerprint": {"query": False, "body": True, "headers": []},
}
# Response headers the proxy may not take over for replay_header / expires_header.
_RESERVED_RESPONSE_HEADERS = frozenset({
    "connection", "content-encoding", "content-length", "content-type", "date",
    "keep-alive", "location", "server", "set-cookie", "te", "trailer",
    "transfer-encoding", "upgrade", "idempotency-body",
})
# Request headers an upstream_key may not replace: framing, routing and credentials.
_RESERVED_REQUEST_HEADERS = frozenset({
    "authorization", "connection", "content-length", "content-type", "cookie", "host",
    "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect",
    "proxy-authorization", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
})
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (methods)


@dataclass
class _Layers:
    """A route's merged fields and, for each, the path of the layer that set it."""

    path: str
    values: dict[str, Any] = field(default_factory=dict)
    where: dict[str, str] = field(default_factory=dict)

    def add(self, prefix: str, data: dict[str, Any]) -> None:
        for name, value in data.items():
            if name == "fingerprint":  # merges field by field (checked by _section_fp)
                merged = dict(self.values.get("fingerprint", {}))
                for sub, v in value.items():
                    merged[sub] = v
                    self.where[f"fingerprint.{sub}"] = prefix
                value = merged
            self.values[name] = value
            self.where[name] = prefix

    def at(self, name: str) -> str:
        """`defaults.ttl`, `routes[2].preset.key` or `routes[2].ttl`: where it was set."""
        return f"{self.where.get(name, self.path)}.{name}"


def parse_routes(r: Reader, raw: object, raw_defaults: object) -> tuple[Route, ...]:
    defaults = r.section(raw_defaults, "defaults", DEFAULT_FIELDS)
    _section_fp(r, defaults, "defaults")
    if defaults:  # checked once on its own, so it is checked even with no routes
        layers = _Layers("defaults")
        layers.add("defaults", defaults)
        _parse_route(r, layers, check_params=False)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.report(f"routes: expected a list of routes, got {raw!r}")
        return ()
    routes: list[Route] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        route = _parse_route(r, _layers_of(r, item, defaults, f"routes[{i}]"))
        if route is not None:
            if route.name and route.name in names:
                r.report(f"routes[{i}].name: {route.name!r} is used by an earlier route")
            names.add(route.name)
            routes.append(route)
    return tuple(routes)


def _layers_of(r: Reader, item: object, defaults: dict[str, Any], path: str) -> _Layers:
    data = r.section(item, path, ROUTE_FIELDS)
    _section_fp(r, data, path)
    layers = _Layers(path)
    layers.add("defaults", defaults)
    preset = data.get("preset")
    if preset is not None:
        if isinstance(preset, str) and preset in PRESETS:
            layers.add(f"{path}.preset", _PRESET_COMMON)
            layers.add(f"{path}.preset", PRESETS[preset])
        else:
            r.report(f"{path}.preset: {preset!r} is not one of: {', '.join(PRESETS)}")
    layers.add(path, data)
    if "name" not in data and isinstance(item, dict):
        r.report(f"{path}.name: missing (every route needs a unique name)")
    return layers


def _section_fp(r: Reader, data: dict[str, Any], prefix: str) -> None:
    """Check a layer's own `fingerprint` mapping (unknown fields, ${VAR}) before merging."""
    if "fingerprint" in data:
        data["fingerprint"] = r.section(data["fingerprint"], f"{prefix}.fingerprint",
                                        FINGERPRINT_FIELDS)


# A route with every default: where the loader takes the defaults of fields a layer leaves
# unset, so each is written once, in schema.py.
_ROUTE = Route(name="", methods=frozenset(), path=PathPattern.compile("/"))


def _parse_route(r: Reader, layers: _Layers, *, check_params: bool = True) -> Route | None:
    d, at = layers.values, layers.at
    name = r.get(d, "name", at("name"), _name, "")
    match = r.section(d.get("match"), at("match"),
                      {"methods", "path", "trailing_slash", "case_insensitive"})
    if check_params and "path" not in match:
        r.report(f"{at('match')}.path: missing")
        return None
    trailing = r.get(match, "trailing_slash", f"{at('match')}.trailing_slash",
                     enum_(TrailingSlash), _ROUTE.trailing_slash)
    fold = r.get(match, "case_insensitive", f"{at('match')}.case_insensitive", bool_,
                 _ROUTE.case_insensitive)
    pattern = r.get(match, "path", f"{at('match')}.path", _pattern(
        trailing_slash=trailing is TrailingSlash.IGNORE, case_insensitive=fold),
        PathPattern.compile("/"))
    methods = r.get(match, "methods", f"{at('match')}.methods", _methods, frozenset({"POST"}))
    key = _parse_key(r, d.get("key"), at("key"), pattern if check_params else None)
    route = Route(name=name, methods=methods, path=pattern, trailing_slash=trailing,
                  case_insensitive=fold, key=key,
                  preset=_preset_name(d.get("preset")),
                  tenant=_parse_tenant(r, d.get("tenant"), at("tenant")),
                  fingerprint=_parse_fingerprint(r, d.get("fingerprint"), layers),
                  **_policies(r, layers))
    _check_route(r, route, layers)
    return route


def _policies(r: Reader, layers: _Layers) -> dict[str, Any]:
    """The scalar fields: each parsed from whichever layer set it, or the Route default."""
    d, at = layers.values, layers.at
    parsers: dict[str, Callable[[object], Any]] = {
        "require_key": bool_, "ttl": _positive(parse_duration),
        "lock_timeout": _positive(parse_duration), "concurrent": enum_(Concurrent),
        "wait_timeout": parse_duration, "release_statuses": _statuses,
        "unknown_outcome": enum_(UnknownOutcome), "max_request_body": parse_size,
        "max_stored_body": parse_size, "store_unavailable": enum_(StoreUnavailablePolicy),
        "replay_set_cookie": bool_, "replay_header": _response_header,
        "mismatch_status": _mismatch_status, "upstream": upstream_ref,
    }
    dflt = _ROUTE
    out = {f: r.get(d, f, at(f), parse, getattr(dflt, f)) for f, parse in parsers.items()}
    expires = d.get("expires_header", dflt.expires_header)
    out["expires_header"] = None if expires is None or expires is False else \
        r.get(d, "expires_header", at("expires_header"), _response_header,
              dflt.expires_header)
    out["upstream_key"] = _parse_upstream_key(r, d.get("upstream_key"), at("upstream_key"))
    return out


def _parse_upstream_key(r: Reader, raw: object, path: str) -> UpstreamKey:
    d = r.section(raw, path, {"header"})
    if raw is not None and "header" not in d:
        r.report(f"{path}.header: missing (the header the upstream dedupes on)")
    return UpstreamKey(header=r.get(d, "header", f"{path}.header", parse_header_name,
                                    UpstreamKey().header))


def _check_route(r: Reader, route: Route, layers: _Layers) -> None:
    """Problems that only show in a combination of fields."""
    bucket = route.key.bucket
    if bucket is not None and route.ttl < bucket:
        r.report(f"{layers.at('ttl')}: {format_duration(route.ttl)} is shorter than "
                 f"key.bucket ({format_duration(bucket)}): a duplicate later in the same "
                 "bucket would run again")
    if route.lock_timeout > route.ttl:
        r.report(f"{layers.at('lock_timeout')}: {format_duration(route.lock_timeout)} is "
                 f"longer than ttl ({format_duration(route.ttl)}): a claim's lease must end "
                 "within its key's window")
    up_key = route.upstream_key.header
    if up_key is not None and (up_key.lower() in _RESERVED_REQUEST_HEADERS or
                               up_key.lower() == route.tenant.header.lower()):
        r.report(f"{layers.at('upstream_key')}.header: {up_key!r} is a header the proxy "
                 "or the tenant needs; name the upstream's idempotency header")
    if route.expires_header is not None and \
            route.expires_header.lower() == route.replay_header.lower():
        r.report(f"{layers.at('expires_header')}: {route.expires_header!r} is also the "
                 "replay_header")


def _parse_key(r: Reader, raw: object, path: str, pattern: PathPattern | None) -> KeySource:
    if raw is None:
        return KeySource()
    d = r.section(raw, path, KEY_FIELDS)
    given = [k for k in ("header", "path", "body") if k in d]
    if len(given) != 1:
        r.report(f"{path}: set exactly one of header, path, body (got "
                 f"{', '.join(given) or 'none'})")
        return KeySource()
    for extra in ("bucket", "raw"):
        if extra in d and "body" not in d:
            r.report(f"{path}.{extra}: only applies to key.body")
    if "header" in d:
        return KeySource(header=r.get(d, "header", f"{path}.header", parse_header_name,
                                      KeySource().header))
    if "path" in d:
        param = r.get(d, "path", f"{path}.path", str_, "")
        if pattern is not None and param not in pattern.params:
            r.report(f"{path}.path: {param!r} is not a parameter of {pattern.text!r} "
                     f"(has: {', '.join(pattern.params) or 'none'})")
        return KeySource(header=None, path=param)
    return _parse_body_key(r, d, path)


def _parse_body_key(r: Reader, d: dict[str, Any], path: str) -> KeySource:
    whole: tuple[str, ...] = ("",)
    pointers = r.get(d, "body", f"{path}.body", _pointers, whole)
    dflt = KeySource()
    src = KeySource(header=None, body=pointers,
                    bucket=r.get(d, "bucket", f"{path}.bucket", _positive(parse_duration),
                                 dflt.bucket),
                    raw=r.get(d, "raw", f"{path}.raw", bool_, dflt.raw))
    if src.raw and (len(src.body) != 1 or src.body[0] == "" or src.bucket is not None):
        r.report(f"{path}.raw: true needs exactly one pointer to a value and no bucket "
                 f"(got body: {list(src.body)}"
                 f"{', bucket' if src.bucket is not None else ''})")
    return src


def _parse_tenant(r: Reader, raw: object, path: str) -> Tenant:
    if raw is None or raw == "authorization":
        return Tenant()
    if raw == "none":
        return Tenant(mode=TenantMode.NONE, header="")
    if isinstance(raw, dict):
        d = r.section(raw, path, {"header", "missing"})
        missing = r.get(d, "missing", f"{path}.missing", enum_(MissingCredential),
                        Tenant().missing)
        if "header" not in d:  # {missing: share}: the Authorization header still
            return Tenant(missing=missing)
        header = r.get(d, "header", f"{path}.header", parse_header_name, "")
        if not header:
            return Tenant()
        mode = TenantMode.AUTHORIZATION if header.lower() == "authorization" else \
            TenantMode.HEADER
        return Tenant(mode=mode, header=header if mode is TenantMode.HEADER else
                      "Authorization", missing=missing)
    r.report(f"{path}: {raw!r} is not one of: authorization, none, "
             "{header: NAME, missing: reject | share}")
    return Tenant()


def _preset_name(value: object) -> str | None:
    return value if isinstance(value, str) and value in PRESETS else None


def _parse_fingerprint(r: Reader, raw: object, layers: _Layers) -> Fingerprint:
    d: dict[str, Any] = raw if isinstance(raw, dict) else {}
    at, dflt = layers.at, Fingerprint()
    ignore = r.get(d, "ignore", at("fingerprint.ignore"), _ignore_pointers, dflt.ignore)
    fp = Fingerprint(
        query=r.get(d, "query", at("fingerprint.query"), bool_, dflt.query),
        body=r.get(d, "body", at("fingerprint.body"), bool_, dflt.body),
        headers=r.get(d, "headers", at("fingerprint.headers"), _header_list, dflt.headers),
        ignore=ignore,
        canonical_json=r.get(d, "canonical_json", at("fingerprint.canonical_json"), bool_,
                             bool(ignore)))
    if fp.ignore and not fp.body:
        r.report(f"{at('fingerprint.ignore')}: only applies when fingerprint.body is true")
    if fp.ignore and not fp.canonical_json:
        r.report(f"{at('fingerprint.canonical_json')}: must be true with ignore (the body "
                 "is re-serialised without the ignored fields)")
    return fp


def _name(value: object) -> str:
    text = str_(value)
    if not text or len(text) > 100 or any(c in text for c in ":\x00\n"):
        raise ValueError(f"{value!r} is not a route name (1-100 characters, no ':')")
    return text


def _pattern(*, trailing_slash: bool, case_insensitive: bool
             ) -> Callable[[object], PathPattern]:
    def parse(value: object) -> PathPattern:
        return PathPattern.compile(str_(value), trailing_slash=trailing_slash,
                                   case_insensitive=case_insensitive)
    return parse


def _methods(value: object) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or \
            not all(isinstance(m, str) and _TOKEN.match(m) for m in items):
        raise ValueError(f"{value!r} is not a list of methods like [POST, PUT]")
    methods = frozenset(m.upper() for m in items)
    safe = sorted(methods & SAFE_METHODS)
    if safe:
        verb = "is a safe method" if len(safe) == 1 else "are safe methods"
        raise ValueError(f"{', '.join(safe)} {verb} and never guarded")
    return methods


def _statuses(value: object) -> frozenset[int]:
    if not isinstance(value, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599 for s in value):
        raise ValueError(f"{value!r} is not a list of HTTP statuses like [429, 503]")
    return frozenset(value)


MISMATCH_STATUSES = (400, 409, 422)


def _mismatch_status(value: object) -> int:
    # 422 is the IETF draft's answer; some clients read 422 as "fix the body, do not
    # retry" and want 409 (conflict) or 400 instead (draft issue #42).
    if isinstance(value, bool) or value not in MISMATCH_STATUSES:
        raise ValueError(f"{value!r} is not one of: 400, 409, 422")
    assert isinstance(value, int)
    return value


def _pointer(value: object) -> str:
    # RFC 6901 §3: '' or '/'-separated tokens; '~' only as '~0' or '~1'.
    if not isinstance(value, str) or (value and not value.startswith("/")) or \
            re.search(r"~(?![01])", value):
        raise ValueError(f"{value!r} is not a JSON pointer (RFC 6901: '' or /a/b, "
                         "with ~0 for ~ and ~1 for /)")
    return value


def _pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{value!r} is not a list of JSON pointers like [/to, /template]")
    return tuple(_pointer(p) for p in value)


def _ignore_pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of JSON pointers like [/timestamp]")
    pointers = tuple(_pointer(p) for p in value)
    if "" in pointers:
        raise ValueError("'' would ignore the whole body; set fingerprint.body: false")
    return pointers


def _header_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of header names")
    return tuple(parse_header_name(h) for h in value)


def _response_header(value: object) -> str:
    name = parse_header_name(value)
    if name.lower() in _RESERVED_RESPONSE_HEADERS:
        raise ValueError(f"{name!r} is a header the proxy or the upstream sets itself")
    return name


def _positive(parse: Callable[[object], float]) -> Callable[[object], float]:
    def check(value: object) -> float:
        result = parse(value)
        if result <= 0:
            raise ValueError(f"{value!r} must be more than zero")
        return result
    return check
