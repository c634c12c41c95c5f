"""Property-based tests (hypothesis): config parsing never crashes and names field paths;
key and fingerprint handling hold their invariants for any input."""

from __future__ import annotations

import json
import re
import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import keys
from proxy.config import Config, Route, loads
from proxy.errors import ConfigError, KeyMalformed, KeyMissing
from proxy.sealing import Sealer

SEALER = Sealer(keys=(), installation_secret=b"t" * 32)
TENANT_HASH, BODY_HASH = SEALER.tenant_hash, SEALER.body_key
SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# --- config ----------------------------------------------------------------------------

FIELDS = ["listen", "admin", "upstream", "database", "defaults", "routes", "data_dir",
          "workers", "shutdown_grace", "sweep_interval", "logging", "url", "name", "match",
          "methods", "path", "key", "header", "body", "bucket", "ttl", "lock_timeout",
          "concurrent", "wait_timeout", "tenant", "fingerprint", "release_statuses",
          "unknown_outcome", "max_request_body", "max_stored_body", "preset",
          "require_key", "store_unavailable", "query", "headers", "raw"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
           st.text(max_size=20) | st.sampled_from(["30s", "1h", "10MiB", "${X}", "${X:-1s}",
                                                    "wait", "reject", "/a/{id}", "POST"]))
yaml_docs = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) |
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), children, max_size=5),
    max_leaves=30)

BASE: dict[str, Any] = {
    "upstream": {"url": "http://127.0.0.1:9000", "timeout": "5s"},
    "defaults": {"ttl": "24h"},
    "routes": [{"name": "charges", "match": {"methods": ["POST"], "path": "/v1/charges"},
                "require_key": True},
               {"name": "orders", "match": {"methods": ["PUT"], "path": "/orders/{id}"},
                "key": {"path": "id"}}],
}
PROBLEM = re.compile(r"^(?P<path>[^\n:][^\n]*?): \S")


def _load(text: str, env: dict[str, str] | None = None) -> Config | ConfigError:
    try:
        return loads(text, env=env or {})
    except ConfigError as exc:
        return exc


def _problems_have_paths(err: ConfigError) -> None:
    assert err.problems
    for problem in err.problems:
        assert PROBLEM.match(problem), f"no field path in {problem!r}"


@SETTINGS
@given(st.text(max_size=300))
@example("routes: [{name: a, match: {path: /a}}, {name: a, match: {path: /b}}]")
@example("routes:\n  - name: x\n    match: {path: '/a/{'}")
@example("listen: ${NOPE}")
def test_any_text_loads_or_names_the_field(text):
    """Arbitrary text gives a Config or a ConfigError whose every line names a path."""
    got = _load(text)
    if isinstance(got, ConfigError):
        _problems_have_paths(got)


@SETTINGS
@given(yaml_docs, st.dictionaries(st.sampled_from(["X", "Y"]), st.text(max_size=5)))
@example({"": None}, {})  # found by this test: the problem read ": unknown field"
@example({"routes": [{"name": "a", "match": {"path": "/a"}, "key": {"body": []}}]}, {})
@example({"defaults": {"tenant": {"header": ""}}, "routes": []}, {})
def test_any_yaml_structure_loads_or_names_the_field(doc, env):
    """Any YAML structure (known and unknown fields, any types) never raises a traceback."""
    got = _load(yaml.safe_dump(doc), env)
    if isinstance(got, ConfigError):
        _problems_have_paths(got)


BAD_VALUES = {
    "ttl": st.text(max_size=10).filter(lambda s: not re.match(r"^\s*\d", s)),
    "lock_timeout": st.sampled_from(["-1s", "1 fortnight", "", "s", "1.5.5s", "1e3s"]),
    "wait_timeout": st.dictionaries(st.text(max_size=3), st.integers(), min_size=1),
    "concurrent": st.text(max_size=10).filter(lambda s: s not in ("reject", "wait")),
    "unknown_outcome": st.integers() | st.sampled_from(["retryy", "FAIL", ""]),
    "require_key": st.integers() | st.text(max_size=4),
    "max_request_body": st.sampled_from(["10 MB!", "-1", "1TiB", "ten", "1.5MiB"]),
    "release_statuses": st.sampled_from([[99], [600], "429", [True], [{"a": 1}]]),
    "store_unavailable": st.text(max_size=8).filter(
        lambda s: s not in ("reject", "pass_through")),
}


@SETTINGS
@given(st.sampled_from(sorted(BAD_VALUES)), st.integers(0, 1), st.data())
def test_a_bad_route_field_is_reported_at_its_path(field, index, data):
    """One invalid route field: a ConfigError naming routes[i].field, never a traceback."""
    value = data.draw(BAD_VALUES[field])
    doc = json.loads(json.dumps(BASE))
    doc["routes"][index][field] = value
    got = _load(yaml.safe_dump(doc))
    assert isinstance(got, ConfigError), f"{field}={value!r} was accepted"
    _problems_have_paths(got)
    assert any(p.startswith(f"routes[{index}].{field}") for p in got.problems), got.problems


@SETTINGS
@given(st.sampled_from(sorted(BAD_VALUES)), st.data())
def test_a_bad_default_is_reported(field, data):
    """An invalid field under `defaults` is reported with a path (defaults or a route)."""
    doc = json.loads(json.dumps(BASE))
    doc["defaults"][field] = data.draw(BAD_VALUES[field])
    got = _load(yaml.safe_dump(doc))
    assert isinstance(got, ConfigError)
    _problems_have_paths(got)
    assert any(field in p.split(":", 1)[0] for p in got.problems), got.problems


# --- keys ------------------------------------------------------------------------------

printable = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)], min_size=1, max_size=255)
valid_keys = printable.filter(lambda k: k == k.strip(" \t") and not k.startswith('"'))


def sf_string(key: str) -> str:
    return '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


@SETTINGS
@given(st.text(max_size=300))
@example("\x00")
@example('"\\')
@example('"abc"def"')
def test_any_header_value_is_a_valid_key_or_a_400(raw):
    """Any header value yields a 1-255 printable-ASCII key or KeyMalformed, nothing else."""
    try:
        key = keys.parse_key_value(raw, source="Idempotency-Key header")
    except KeyMalformed:
        return
    assert 1 <= len(key) <= 255
    assert all(" " <= c <= "~" for c in key)


@SETTINGS
@given(valid_keys)
def test_bare_token_and_sf_string_name_the_same_key(key):
    """A key and its RFC 8941 sf-string form are the same key."""
    assert keys.parse_key_value(key, source="h") == key
    assert keys.parse_key_value(sf_string(key), source="h") == key


@SETTINGS
@given(st.lists(st.text(max_size=20), min_size=2, max_size=5))
def test_several_key_headers_are_always_a_400(values):
    """Two or more key header lines are ambiguous: always KeyMalformed."""
    with pytest.raises(KeyMalformed):
        keys.key_from_headers(values, header="Idempotency-Key")


def _route(extra: str = "") -> Route:
    cfg = loads("routes:\n  - {name: r, match: {methods: [POST], path: '/r/*'}" + extra + "}",
                env={})
    return cfg.routes[0]


ROUTE = _route()
requests = st.tuples(st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]),
                     st.text(string.printable, max_size=12).map(lambda s: "/r/" + s),
                     st.text(string.printable, max_size=12), st.binary(max_size=40))


def _fp(route: Route, req: tuple[str, str, str, bytes]) -> bytes:
    method, path, query, body = req
    return keys.fingerprint(route, method=method, path=path, query=query, body=body,
                            headers=CIMultiDict())


@SETTINGS
@given(requests, requests)
@example(("POST", "/r/a", "b", b""), ("POST", "/r/ab", "", b""))
@example(("POST", "/r/a", "", b"b"), ("POST", "/r/ab", "", b""))
@example(("POST", "/r/", "a", b""), ("POST", "/r/", "", b"a"))
def test_fingerprints_differ_exactly_when_requests_differ(a, b):
    """Equal requests share a fingerprint; any difference in method, path, query or body
    (however the parts are split) gives another."""
    assert (_fp(ROUTE, a) == _fp(ROUTE, b)) == (a == b)


@SETTINGS
@given(requests, st.binary(max_size=40))
def test_body_excluded_from_fingerprint_does_not_count(req, other_body):
    """With fingerprint.body false, the body never changes the fingerprint."""
    route = _route(", fingerprint: {body: false}")
    assert _fp(route, req) == _fp(route, (*req[:3], other_body))


@SETTINGS
@given(st.text(max_size=40), st.text(max_size=40))
def test_tenants_are_separate_scopes_and_never_hold_credentials(a, b):
    """Different credentials are different scopes; a scope shows no credential."""
    norm_a, norm_b = (keys.normalize_credential(v, scheme=True) for v in (a, b))
    assume(norm_a and norm_b)  # none at all is refused (test_keys)
    sa = keys.scope_of(ROUTE, keys.tenant_of(ROUTE, CIMultiDict({"Authorization": a}),
                                             keyed=TENANT_HASH))
    sb = keys.scope_of(ROUTE, keys.tenant_of(ROUTE, CIMultiDict({"Authorization": b}),
                                             keyed=TENANT_HASH))
    assert (sa == sb) == (norm_a == norm_b)
    tenant = sa.split(":", 1)[1]
    assert re.fullmatch(r"[0-9a-f]{32}", tenant)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=15)
BODY_ROUTE = _route(", key: {body: [/a, /b]}, require_key: true")
RAW_ROUTE = _route(", key: {body: [/id], raw: true}, require_key: true")


@SETTINGS
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps({"a": v}).encode()),
       st.sampled_from(["application/json", "application/x-www-form-urlencoded", "",
                        "text/plain"]))
@example(b"[" * 50000 + b"]" * 50000, "application/json")
@example(b'{"a": 1, "a": 2, "b": 3}', "application/json")
@example(b'{"a": NaN, "b": 1}', "application/json")
@example(b"a=%ff&b=%00", "application/x-www-form-urlencoded")
def test_body_keys_are_a_key_or_a_400(body, content_type):
    """Any body gives a body key (printable, bounded) or KeyMissing/KeyMalformed."""
    for route in (BODY_ROUTE, RAW_ROUTE):
        try:
            key = keys.body_key(route, body, content_type=content_type, now=0.0,
                                 keyed=BODY_HASH)
        except (KeyMissing, KeyMalformed):
            continue
        assert key is not None and 1 <= len(key) <= 255
        assert all(" " <= c <= "~" for c in key)


@SETTINGS
@given(json_values, json_values)
def test_body_keys_depend_on_the_selected_values_only(a, b):
    """Key order, whitespace and unselected fields do not change a body key; values do."""
    one = json.dumps({"a": a, "b": b, "zzz": 1}).encode()
    two = json.dumps({"zzz": 2, "b": b, "a": a}, indent=2).encode()
    k1 = keys.body_key(BODY_ROUTE, one, content_type="application/json", now=0.0,
                        keyed=BODY_HASH)
    k2 = keys.body_key(BODY_ROUTE, two, content_type="application/json", now=0.0,
                        keyed=BODY_HASH)
    assert k1 == k2
    assume(a != b)
    swapped = json.dumps({"a": b, "b": a}).encode()
    assert keys.body_key(BODY_ROUTE, swapped, content_type="application/json",
                         now=0.0, keyed=BODY_HASH) != k1
