"""Parse `routes` (with `defaults` and `preset`s merged in) into `Route` dataclasses.

A route's fields come from three layers, later ones winning: `defaults`, the route's
`preset`, the route itself. `key` and `tenant` replace as a whole; `fingerprint` merges
field by field. Every problem names the layer it came from, so a bad `defaults.ttl` is
reported once, as `defaults.ttl`, whether there are no routes or twenty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.config.presets import PRESET_COMMON, PRESETS
from proxy.config.route_keys import parse_key, parse_tenant
from proxy.config.route_values import (
    parse_header_list,
    parse_ignore_pointers,
    parse_methods,
    parse_mismatch_status,
    parse_pattern,
    parse_response_header,
    parse_route_name,
    parse_stale_status,
    parse_statuses,
    parse_store_statuses,
    positive,
)
from proxy.config.schema import (
    Concurrent,
    Fingerprint,
    Route,
    StoreUnavailablePolicy,
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
)
from proxy.paths import PathPattern

ROUTE_FIELDS = {
    "name", "match", "key", "preset", "require_key", "tenant", "fingerprint", "ttl",
    "lock_timeout", "concurrent", "wait_timeout", "release_statuses", "unknown_outcome",
    "max_request_body", "max_stored_body", "store_unavailable", "replay_set_cookie",
    "replay_header", "expires_header", "mismatch_status", "upstream", "upstream_key",
    "store_statuses", "omitted_header", "max_key_age", "stale_status",
}
DEFAULT_FIELDS = ROUTE_FIELDS - {"name", "match", "preset"}
FINGERPRINT_FIELDS = {"query", "body", "headers", "ignore", "canonical_json"}

# Request headers an upstream_key may not replace: framing, routing and credentials.
_RESERVED_REQUEST_HEADERS = frozenset({
    "authorization", "connection", "content-length", "content-type", "cookie", "host",
    "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect",
    "proxy-authorization", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
})


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
            layers.add(f"{path}.preset", PRESET_COMMON)
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
    name = r.get(d, "name", at("name"), parse_route_name, "")
    match = r.section(d.get("match"), at("match"),
                      {"methods", "path", "trailing_slash", "case_insensitive"})
    if check_params and "path" not in match:
        r.report(f"{at('match')}.path: missing")
        return None
    trailing = r.get(match, "trailing_slash", f"{at('match')}.trailing_slash",
                     enum_(TrailingSlash), _ROUTE.trailing_slash)
    fold = r.get(match, "case_insensitive", f"{at('match')}.case_insensitive", bool_,
                 _ROUTE.case_insensitive)
    pattern = r.get(match, "path", f"{at('match')}.path", parse_pattern(
        trailing_slash=trailing is TrailingSlash.IGNORE, case_insensitive=fold),
        PathPattern.compile("/"))
    methods = r.get(match, "methods", f"{at('match')}.methods", parse_methods, frozenset({"POST"}))
    key = parse_key(r, d.get("key"), at("key"), pattern if check_params else None)
    route = Route(name=name, methods=methods, path=pattern, trailing_slash=trailing,
                  case_insensitive=fold, key=key,
                  preset=_preset_name(d.get("preset")),
                  tenant=parse_tenant(r, d.get("tenant"), at("tenant")),
                  fingerprint=_parse_fingerprint(r, d.get("fingerprint"), layers),
                  **_policies(r, layers))
    _check_route(r, route, layers)
    return route


def _policies(r: Reader, layers: _Layers) -> dict[str, Any]:
    """The scalar fields: each parsed from whichever layer set it, or the Route default."""
    d, at = layers.values, layers.at
    parsers: dict[str, Callable[[object], Any]] = {
        "require_key": bool_, "ttl": positive(parse_duration),
        "lock_timeout": positive(parse_duration), "concurrent": enum_(Concurrent),
        "wait_timeout": parse_duration, "release_statuses": parse_statuses,
        "unknown_outcome": enum_(UnknownOutcome), "max_request_body": parse_size,
        "max_stored_body": parse_size, "store_unavailable": enum_(StoreUnavailablePolicy),
        "replay_set_cookie": bool_, "replay_header": parse_response_header,
        "omitted_header": parse_response_header,
        "mismatch_status": parse_mismatch_status, "upstream": upstream_ref,
        "store_statuses": parse_store_statuses, "stale_status": parse_stale_status,
    }
    dflt = _ROUTE
    out = {f: r.get(d, f, at(f), parse, getattr(dflt, f)) for f, parse in parsers.items()}
    expires = d.get("expires_header", dflt.expires_header)
    out["expires_header"] = None if expires is None or expires is False else \
        r.get(d, "expires_header", at("expires_header"), parse_response_header,
              dflt.expires_header)
    age = d.get("max_key_age")
    out["max_key_age"] = None if age is None else \
        r.get(d, "max_key_age", at("max_key_age"), positive(parse_duration), None)
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
    if route.unknown_outcome is UnknownOutcome.RESEND and route.upstream_key.header is None:
        r.report(f"{layers.at('unknown_outcome')}: resend needs upstream_key (a re-send "
                 "without a key the upstream dedupes on could act twice)")
    bucket = route.key.bucket
    if bucket is not None and route.ttl < bucket:
        r.report(f"{layers.at('ttl')}: {format_duration(route.ttl)} is shorter than "
                 f"key.bucket ({format_duration(bucket)}): a duplicate later in the same "
                 "bucket would run again")
    if route.lock_timeout > route.ttl:
        r.report(f"{layers.at('lock_timeout')}: {format_duration(route.lock_timeout)} is "
                 f"longer than ttl ({format_duration(route.ttl)}): a claim's lease must end "
                 "within its key's window")
    _check_statuses(r, route, layers)
    up_key = route.upstream_key.header
    if up_key is not None and (up_key.lower() in _RESERVED_REQUEST_HEADERS or
                               up_key.lower() == route.tenant.header.lower()):
        r.report(f"{layers.at('upstream_key')}.header: {up_key!r} is a header the proxy "
                 "or the tenant needs; name the upstream's idempotency header")
    _check_markers(r, route, layers)


def _check_markers(r: Reader, route: Route, layers: _Layers) -> None:
    """The proxy's own response headers are three different names."""
    seen = {route.replay_header.lower(): "replay_header"}
    for field_, name in (("expires_header", route.expires_header),
                         ("omitted_header", route.omitted_header)):
        if name is None:
            continue
        if name.lower() in seen:
            r.report(f"{layers.at(field_)}: {name!r} is also the {seen[name.lower()]}")
        seen.setdefault(name.lower(), field_)


def _check_statuses(r: Reader, route: Route, layers: _Layers) -> None:
    """A status or class in both lists has no answer: refused, naming both (an integer
    in one and its class in the other is not a contradiction: the integer wins)."""
    both = (route.store_statuses or frozenset()) & route.release_statuses
    if both:
        shown = ", ".join(str(s) for s in sorted(both, key=str))
        where = f"set at {layers.at('release_statuses')}" if "release_statuses" in \
            layers.where else "its default"
        r.report(f"{layers.at('store_statuses')}: {shown} is also in release_statuses "
                 f"({where}): an answer is either stored or released; remove it from one "
                 "of the two")


def _preset_name(value: object) -> str | None:
    return value if isinstance(value, str) and value in PRESETS else None


def _parse_fingerprint(r: Reader, raw: object, layers: _Layers) -> Fingerprint:
    d: dict[str, Any] = raw if isinstance(raw, dict) else {}
    at, dflt = layers.at, Fingerprint()
    ignore = r.get(d, "ignore", at("fingerprint.ignore"), parse_ignore_pointers, dflt.ignore)
    fp = Fingerprint(
        query=r.get(d, "query", at("fingerprint.query"), bool_, dflt.query),
        body=r.get(d, "body", at("fingerprint.body"), bool_, dflt.body),
        headers=r.get(d, "headers", at("fingerprint.headers"), parse_header_list, dflt.headers),
        ignore=ignore,
        canonical_json=r.get(d, "canonical_json", at("fingerprint.canonical_json"), bool_,
                             bool(ignore)))
    if fp.ignore and not fp.body:
        r.report(f"{at('fingerprint.ignore')}: only applies when fingerprint.body is true")
    if fp.ignore and not fp.canonical_json:
        r.report(f"{at('fingerprint.canonical_json')}: must be true with ignore (the body "
                 "is re-serialised without the ignored fields)")
    return fp
