"""Pure config parsing: values, ${VAR} expansion, defaults and presets merged, and every
error naming its field path and the bad value."""

from __future__ import annotations

import textwrap

import pytest

from proxy.config import Concurrent, Config, TenantMode, loads
from proxy.config.routes import PRESETS
from proxy.config.values import format_duration, parse_duration, parse_size
from proxy.errors import ConfigError

HEAD = "upstream: {url: 'http://127.0.0.1:9000'}\n"


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return loads(HEAD + textwrap.dedent(text), env=env or {})


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    return info.value.problems


def one_route(fields: str) -> str:
    """A config with one route at /r plus `fields` (YAML lines of that route)."""
    return "routes:\n  - name: r\n    match: {path: \"/r/{id}\"}\n" + \
        textwrap.indent(textwrap.dedent(fields), "    ")


# --- scalar values --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5), ("30s", 30), ("15m", 900), ("24h", 86400), ("7d", 604800),
    ("1.5h", 5400), ("1h30m", 5400), ("1h 30m", 5400), ("30 s", 30), (0, 0), ("0", 0),
])
def test_durations(text: object, seconds: float) -> None:
    """Durations take ms, s, m, h, d, decimals and sums like 1h30m."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["24 hours", "30", 30, "-1s", "1w", "", "h", True, 1.5,
                                  None, ["1s"]])
def test_bad_durations(text: object) -> None:
    """Anything else is refused with the value and an example of the format."""
    with pytest.raises(ValueError, match="is not a duration like 30s, 15m, 24h, 7d"):
        parse_duration(text)


def test_durations_read_back_in_messages() -> None:
    """Messages show durations in the largest whole unit."""
    assert [format_duration(s) for s in (86400, 5400, 0.5, 30, 1.25)] == \
        ["1d", "90m", "500ms", "30s", "1250ms"]


@pytest.mark.parametrize(("text", "size"), [
    ("512KiB", 512 * 1024), ("10MiB", 10 * 2**20), ("1GiB", 2**30), ("1KB", 1000),
    ("2MB", 2_000_000), ("100B", 100), ("100", 100), (4096, 4096), ("10 MiB", 10 * 2**20),
])
def test_sizes(text: object, size: int) -> None:
    """Sizes are bytes, KiB/MiB/GiB (powers of 2) or KB/MB/GB (powers of 10)."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10 megabytes", "1.5MiB", "-1", "10mib", True, 1.5, ""])
def test_bad_sizes(text: object) -> None:
    """Anything else is refused with the value and an example."""
    with pytest.raises(ValueError, match="is not a size like 512KiB, 10MiB, 1GiB"):
        parse_size(text)


# --- environment ----------------------------------------------------------------------------

def test_env_vars_expand_with_and_without_defaults() -> None:
    """${VAR} takes the variable; ${VAR:-default} falls back when it is unset or empty."""
    cfg = load("""
        listen: ${LISTEN}
        data_dir: ${DATA:-/var/lib/idemproxy}
        database: {url: "${DB:-postgres://fallback}"}
        routes:
          - name: r
            match: {methods: ["${M1}", "${M2:-PATCH}"], path: /r}
            ttl: ${TTL:-2h}
        """, env={"LISTEN": "127.0.0.1:8181", "DB": "", "M1": "PUT", "TTL": "3h"})
    assert str(cfg.listen) == "127.0.0.1:8181"
    assert cfg.data_dir == "/var/lib/idemproxy"
    assert cfg.database.url == "postgres://fallback"
    assert cfg.routes[0].methods == {"PUT", "PATCH"}
    assert cfg.routes[0].ttl == 3 * 3600


def test_unset_env_var_without_default_names_the_field() -> None:
    """An unset ${VAR} with no default is one error, at the field (or item) that uses it."""
    assert problems(one_route("ttl: ${ROUTE_TTL}")) == [
        "routes[0].ttl: environment variable ROUTE_TTL is not set (use ${ROUTE_TTL:-default})"]
    assert problems("routes: [{name: r, match: {path: /r, methods: [POST, '${M}']}}]") == [
        "routes[0].match.methods[1]: environment variable M is not set (use ${M:-default})"]


def test_database_url_from_the_environment_wins() -> None:
    """IDEMPROXY_DATABASE_URL overrides database.url."""
    cfg = load("database: {url: postgres://file}\n",
               env={"IDEMPROXY_DATABASE_URL": "postgres://env"})
    assert cfg.database.url == "postgres://env"


# --- defaults ---------------------------------------------------------------------------------

def test_defaults_merge_into_every_route_and_routes_win() -> None:
    """Every route gets `defaults`; a field on the route overrides it."""
    cfg = load("""
        defaults: {ttl: 7d, concurrent: wait, require_key: true, replay_header: X-Replayed}
        routes:
          - {name: a, match: {path: /a}}
          - {name: b, match: {path: /b}, ttl: 1h, require_key: false}
        """)
    a, b = cfg.routes
    assert (a.ttl, a.concurrent, a.require_key, a.replay_header) == \
        (7 * 86400, Concurrent.WAIT, True, "X-Replayed")
    assert (b.ttl, b.concurrent, b.require_key) == (3600, Concurrent.WAIT, False)


def test_route_defaults_without_any_setting() -> None:
    """A bare route: Idempotency-Key header, POST, 24h, tenant by Authorization."""
    route = load("routes: [{name: r, match: {path: /r}}]").routes[0]
    assert route.key.header == "Idempotency-Key" and route.methods == {"POST"}
    assert route.ttl == 86400 and route.tenant.mode is TenantMode.AUTHORIZATION
    assert route.replay_header == "Idempotent-Replayed"
    assert route.expires_header == "Idempotency-Expires"
    assert (route.fingerprint.query, route.fingerprint.body) == (True, True)


def test_fingerprint_fields_merge_but_key_replaces() -> None:
    """`fingerprint` merges field by field across layers; `key` replaces as a whole."""
    route = load("""
        defaults:
          fingerprint: {query: false}
          key: {header: X-Request-Id}
        routes:
          - name: r
            match: {path: "/r/{id}"}
            fingerprint: {headers: [X-Account]}
            key: {path: id}
        """).routes[0]
    assert route.fingerprint.query is False and route.fingerprint.headers == ("X-Account",)
    assert route.key.path == "id" and route.key.header is None


def test_bad_defaults_are_reported_once_under_defaults() -> None:
    """A bad default names `defaults.*` once, with no routes and with several."""
    for routes in ("", "routes: [{name: a, match: {path: /a}}, {name: b, match: {path: /b}}]"):
        assert problems(f"defaults: {{ttl: 24 hours}}\n{routes}\n") == [
            "defaults.ttl: '24 hours' is not a duration like 30s, 15m, 24h, 7d"]


# --- unknown fields and error paths -----------------------------------------------------

@pytest.mark.parametrize(("text", "problem"), [
    ("listn: 0.0.0.0:8080\n", "listn: unknown field (expected one of: admin, "
     "allow_python_parser, client, data_dir, database, defaults, encryption, listen, "),
    ("defaults: {tll: 1h}\n", "defaults.tll: unknown field"),
    ("defaults: {preset: github}\n", "defaults.preset: unknown field"),
    (one_route("tll: 1h"), "routes[0].tll: unknown field"),
    (one_route("match2: {}"), "routes[0].match2: unknown field"),
    (one_route("key: {heder: X}"), "routes[0].key.heder: unknown field (expected one of: "
     "body, bucket, header, headers, path, raw)"),
    (one_route("fingerprint: {ignor: [/a]}"), "routes[0].fingerprint.ignor: unknown field "
     "(expected one of: body, canonical_json, headers, ignore, query)"),
    ("defaults: {fingerprint: {hdrs: []}}\n", "defaults.fingerprint.hdrs: unknown field"),
    (one_route("tenant: {hdr: X}"), "routes[0].tenant.hdr: unknown field"),
])
def test_unknown_fields_are_named_with_their_path(text: str, problem: str) -> None:
    """A misspelt field is an error at its full path, listing what was expected."""
    assert any(p.startswith(problem) for p in problems(text)), problems(text)


@pytest.mark.parametrize(("fields", "problem"), [
    ("ttl: 24 hours", "routes[0].ttl: '24 hours' is not a duration like 30s, 15m, 24h, 7d"),
    ("ttl: 0s", "routes[0].ttl: '0s' must be more than zero"),
    ("lock_timeout: x", "routes[0].lock_timeout: 'x' is not a duration like 30s, 15m, 24h, 7d"),
    ("max_request_body: lots", "routes[0].max_request_body: 'lots' is not a size like "
     "512KiB, 10MiB, 1GiB"),
    ("concurrent: queue", "routes[0].concurrent: 'queue' is not one of: reject, wait"),
    ("unknown_outcome: maybe", "routes[0].unknown_outcome: 'maybe' is not one of: retry, fail"),
    ("store_unavailable: open", "routes[0].store_unavailable: 'open' is not one of: reject, "
     "pass_through"),
    ("require_key: yes please", "routes[0].require_key: 'yes please' is not true or false"),
    ("release_statuses: [429, 700]", "routes[0].release_statuses: [429, 700] is not a list "
     "of HTTP statuses like [429, 503]"),
    ("tenant: everyone", "routes[0].tenant: 'everyone' is not one of: authorization, none, "
     "{header: NAME, missing: reject | share}"),
    ("tenant: {missing: maybe}", "routes[0].tenant.missing: 'maybe' is not one of: reject, "
     "share"),
    ("match: {path: /a, trailing_slash: loose}", "routes[0].match.trailing_slash: 'loose' "
     "is not one of: ignore, strict"),
    ("tenant: {header: 'X Api'}", "routes[0].tenant.header: 'X Api' is not an HTTP header name"),
    ("preset: gitlab", "routes[0].preset: 'gitlab' is not one of: github, shopify, "
     "standard-webhooks, stripe"),
    ("key: {header: X, path: id}", "routes[0].key: set exactly one of header, path, body "
     "(got header, path)"),
    ("key: {}", "routes[0].key: set exactly one of header, path, body (got none)"),
    ("key: {header: null}", "routes[0].key.header: None is not an HTTP header name"),
    ("key: {path: order}", "routes[0].key.path: 'order' is not a parameter of '/r/{id}' "
     "(has: id)"),
    ("key: {header: X, bucket: 1d}", "routes[0].key.bucket: only applies to key.body"),
    ("key: {path: id, raw: true}", "routes[0].key.raw: only applies to key.body"),
    ("key: {body: to}", "routes[0].key.body: 'to' is not a list of JSON pointers like "
     "[/to, /template]"),
    ("key: {body: [to]}", "routes[0].key.body: 'to' is not a JSON pointer (RFC 6901: '' or "
     "/a/b, with ~0 for ~ and ~1 for /)"),
    ("key: {body: [/a~2]}", "routes[0].key.body: '/a~2' is not a JSON pointer"),
    ("key: {body: [/to], bucket: soon}", "routes[0].key.bucket: 'soon' is not a duration"),
    ("key: {body: [/a, /b], raw: true}", "routes[0].key.raw: true needs exactly one pointer "
     "to a value and no bucket (got body: ['/a', '/b'])"),
    ("key: {body: [/a], raw: true, bucket: 1h}", "routes[0].key.raw: true needs exactly one "
     "pointer to a value and no bucket (got body: ['/a'], bucket)"),
    ("key: {body: [/to], bucket: 2d}", "routes[0].ttl: 1d is shorter than key.bucket (2d): "
     "a duplicate later in the same bucket would run again"),
    ("fingerprint: {ignore: /ts}", "routes[0].fingerprint.ignore: '/ts' is not a list of "
     "JSON pointers like [/timestamp]"),
    ("fingerprint: {ignore: ['']}", "routes[0].fingerprint.ignore: '' would ignore the whole "
     "body; set fingerprint.body: false"),
    ("fingerprint: {ignore: [/ts], body: false}", "routes[0].fingerprint.ignore: only applies "
     "when fingerprint.body is true"),
    ("fingerprint: {ignore: [/ts], canonical_json: false}", "routes[0].fingerprint."
     "canonical_json: must be true with ignore"),
    ("fingerprint: {headers: X-A}", "routes[0].fingerprint.headers: 'X-A' is not a list of "
     "header names"),
    ("fingerprint: strict", "routes[0].fingerprint: expected a mapping, got 'strict'"),
    ("replay_header: 'Is Replay'", "routes[0].replay_header: 'Is Replay' is not an HTTP "
     "header name"),
    ("replay_header: Content-Length", "routes[0].replay_header: 'Content-Length' is a header "
     "the proxy or the upstream sets itself"),
    ("expires_header: Date", "routes[0].expires_header: 'Date' is a header the proxy or the "
     "upstream sets itself"),
    ("replay_header: X-R\nexpires_header: x-r", "routes[0].expires_header: 'x-r' is also "
     "the replay_header"),
])
def test_every_error_names_the_field_path_and_value(fields: str, problem: str) -> None:
    """Each bad field is reported at its path, with the value and what was expected."""
    found = problems(one_route(fields))
    assert any(p.startswith(problem) for p in found), found


@pytest.mark.parametrize(("match", "problem"), [
    ("{path: orders}", "routes[0].match.path: 'orders' is not a path pattern starting with /"),
    ("{methods: [POST]}", "routes[0].match.path: missing"),
    ("{path: /o, methods: POST PUT}", "routes[0].match.methods: 'POST PUT' is not a list of "
     "methods like [POST, PUT]"),
    ("{path: /o, methods: []}", "routes[0].match.methods: [] is not a list of methods"),
    ("{path: /o, methods: [1]}", "routes[0].match.methods: [1] is not a list of methods"),
])
def test_match_errors_name_their_path(match: str, problem: str) -> None:
    """Bad `match` fields are reported at routes[i].match.*."""
    found = problems(f"routes:\n  - name: r\n    match: {match}\n")
    assert any(p.startswith(problem) for p in found), found


def test_all_problems_are_reported_together() -> None:
    """One run lists every problem, across routes, not just the first."""
    found = problems("""
        listen: nowhere
        routes:
          - {name: a, match: {path: /a}, ttl: soon}
          - {name: a, match: {path: /b}, concurrent: later}
          - {match: {path: /c}}
        """)
    assert found == [
        "listen: 'nowhere' is not an address like 0.0.0.0:8080 or [::1]:8080",
        "routes[0].ttl: 'soon' is not a duration like 30s, 15m, 24h, 7d",
        "routes[1].concurrent: 'later' is not one of: reject, wait",
        "routes[1].name: 'a' is used by an earlier route",
        "routes[2].name: missing (every route needs a unique name)",
    ]


# --- safe methods -------------------------------------------------------------------------------

@pytest.mark.parametrize(("methods", "problem"), [
    ("[GET]", "GET is a safe method and never guarded"),
    ("[head]", "HEAD is a safe method and never guarded"),
    ("[POST, OPTIONS]", "OPTIONS is a safe method and never guarded"),
    ("[TRACE, GET, POST]", "GET, TRACE are safe methods and never guarded"),
])
def test_safe_methods_are_refused(methods: str, problem: str) -> None:
    """GET, HEAD, OPTIONS and TRACE can never be guarded; saying so is an error."""
    assert problems(f"routes:\n  - name: r\n    match: {{path: /r, methods: {methods}}}\n") \
        == [f"routes[0].match.methods: {problem}"]


def test_methods_are_upper_cased() -> None:
    """Methods are compared upper-case, however they are written."""
    cfg = load("routes: [{name: r, match: {path: /r, methods: [post, Put, DELETE]}}]")
    assert cfg.routes[0].methods == {"POST", "PUT", "DELETE"}


# --- presets --------------------------------------------------------------------------------

@pytest.mark.parametrize(("preset", "header"), [
    ("github", "X-GitHub-Delivery"), ("shopify", "X-Shopify-Webhook-Id"),
    ("standard-webhooks", "webhook-id"),
])
def test_header_presets(preset: str, header: str) -> None:
    """A header preset: the delivery id header, no tenant, ≥72h, body-only fingerprint."""
    route = load(one_route(f"preset: {preset}")).routes[0]
    assert route.key.header == header and route.preset == preset
    assert route.tenant.mode is TenantMode.NONE
    assert route.ttl >= 72 * 3600 and route.require_key
    fp = route.fingerprint
    assert (fp.query, fp.body, fp.headers) == (False, True, ())


def test_stripe_preset_keys_on_the_raw_event_id() -> None:
    """Stripe: the event's /id itself is the key; pending_webhooks never counts."""
    route = load(one_route("preset: stripe")).routes[0]
    assert route.key.body == ("/id",) and route.key.raw and route.key.header is None
    assert route.tenant.mode is TenantMode.NONE and route.ttl >= 72 * 3600
    fp = route.fingerprint
    assert fp.query is False and fp.canonical_json and fp.ignore == ("/pending_webhooks",)


def test_presets_cover_every_documented_sender() -> None:
    """The four webhook presets of design §3 and issue 31's three event presets exist,
    and no others."""
    assert set(PRESETS) == {"github", "shopify", "standard-webhooks", "stripe",
                            "cloudevents", "sns", "pubsub-push"}


def test_route_fields_win_over_preset_and_preset_over_defaults() -> None:
    """defaults < preset < route: a route's ttl wins; the preset's tenant beats defaults."""
    route = load("""
        defaults: {tenant: {header: X-Api-Key}, ttl: 1h, concurrent: wait}
        routes:
          - name: svix
            match: {path: "/hooks/*"}
            preset: standard-webhooks
            ttl: 7d
            fingerprint: {headers: [webhook-signature-version]}
        """).routes[0]
    assert route.ttl == 7 * 86400
    assert route.tenant.mode is TenantMode.NONE
    assert route.concurrent is Concurrent.WAIT
    assert route.fingerprint.headers == ("webhook-signature-version",)
    assert route.fingerprint.query is False          # still the preset's, merged


def test_errors_in_preset_overrides_name_the_route() -> None:
    """A bad field next to a preset is reported at the route's own path."""
    assert problems(one_route("preset: github\nttl: forever")) == [
        "routes[0].ttl: 'forever' is not a duration like 30s, 15m, 24h, 7d"]


# --- response headers -------------------------------------------------------------------------

def test_replay_and_expires_header_names() -> None:
    """The replay header is renamable; the expiry header is renamable or off."""
    cfg = load("""
        routes:
          - {name: a, match: {path: /a}, replay_header: X-Cache-Replay,
             expires_header: Retry-Safe-Until}
          - {name: b, match: {path: /b}, expires_header: null}
          - {name: c, match: {path: /c}, expires_header: false}
        """)
    a, b, c = cfg.routes
    assert (a.replay_header, a.expires_header) == ("X-Cache-Replay", "Retry-Safe-Until")
    assert b.expires_header is None and c.expires_header is None


def test_workers_default_to_the_cores_available():
    """Without `workers`, the proxy runs one worker per core this process may use."""
    import os

    from proxy.config import loads as load_text

    assert load_text("{}", env={}).workers == len(os.sched_getaffinity(0))


# --- cross-field checks (#14): configs whose fields are fine but cannot work as written ---

UP = "upstream: {url: 'http://127.0.0.1:9'}\n"


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loads(UP + text, env={})
    return info.value.problems


@pytest.mark.parametrize("routes,expect", [
    ("  - {name: all, match: {methods: [POST, PUT], path: '/*'}}\n"
     "  - {name: charges, match: {methods: [POST], path: /v1/charges}, require_key: true}\n",
     "routes[1] ('charges') can never match: every request it would take goes first to "
     "routes[0] ('all', '/*')"),
    ("  - {name: a, match: {methods: [POST], path: /v1/x}}\n"
     "  - {name: b, match: {methods: [POST], path: /v1/x}}\n",
     "routes[1] ('b') has the same path and methods as routes[0] ('a', '/v1/x')"),
    ("  - {name: a, match: {methods: [PUT], path: '/orders/{id}'}}\n"
     "  - {name: b, match: {methods: [PUT], path: /orders/42}}\n",
     "routes[1] ('b') can never match"),
    ("  - {name: a, match: {methods: [POST], path: '/v1/*'}}\n"
     "  - {name: b, match: {methods: [POST], path: '/v1/files/*'}}\n",
     "routes[1] ('b') can never match"),
    ("  - {name: a, match: {path: '/v1/charges?x=1'}}\n",
     "routes[0].match.path: '/v1/charges?x=1' contains ?"),
    ("  - {name: a, match: {path: '/v1/my charges'}}\n",
     "routes[0].match.path: '/v1/my charges' contains whitespace"),
])
def test_routes_that_cannot_work_are_errors(routes, expect):
    """A route hidden behind an earlier one, a duplicate, a path with ? or a space: errors
    naming the route."""
    problems = _problems("routes:\n" + routes)
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("routes", [
    "  - {name: c, match: {methods: [POST], path: /v1/charges}}\n"
    "  - {name: all, match: {methods: [POST], path: '/*'}}\n",
    "  - {name: a, match: {methods: [PUT], path: '/orders/42'}}\n"
    "  - {name: b, match: {methods: [PUT], path: '/orders/{id}'}}\n",
    "  - {name: a, match: {methods: [POST], path: '/v1/files/*'}}\n"
    "  - {name: b, match: {methods: [POST], path: '/v1/*'}}\n",
    "  - {name: a, match: {methods: [POST], path: '/v1/a'}}\n"
    "  - {name: b, match: {methods: [PUT], path: '/v1/a'}}\n",
])
def test_narrower_routes_first_are_fine(routes):
    """The narrower route before the wider one, or other methods, loads without a warning."""
    cfg = loads(UP + "routes:\n" + routes, env={})
    assert cfg.warnings == ()


def test_a_route_losing_some_methods_to_an_earlier_one_is_a_warning():
    """Partly shadowed: it loads, and the warning names the methods and the earlier route."""
    cfg = loads(UP + "routes:\n"
                "  - {name: all, match: {methods: [POST], path: '/*'}}\n"
                "  - {name: o, match: {methods: [POST, PUT], path: '/orders/{id}'}}\n",
                env={})
    assert cfg.warnings == ("routes[1] ('o'): its POST requests go first to routes[0] "
                            "('all', '/*')",)


@pytest.mark.parametrize("text,expect", [
    ("listen: 0.0.0.0:8080\nadmin: {listen: '127.0.0.1:8080'}\n",
     "admin.listen: 127.0.0.1:8080 is the proxied port (listen: 0.0.0.0:8080)"),
    ("listen: 127.0.0.1:8080\nadmin: {listen: '127.0.0.1:8080'}\n", "admin.listen:"),
    ("database: {pool_min: 20, pool_max: 10}\n",
     "database.pool_min: 20 is more than database.pool_max (10)"),
])
def test_top_level_combinations_that_cannot_work_are_errors(text, expect):
    """admin.listen on the proxied port, pool_min above pool_max: errors naming the field."""
    assert any(expect in p for p in _problems(text)), _problems(text)


def test_a_wait_longer_than_the_window_is_a_warning():
    """wait_timeout longer than ttl loads, with a warning naming it."""
    cfg = loads(UP + "routes:\n  - {name: a, match: {path: /a}, ttl: 1m, lock_timeout: 1m,"
                " concurrent: wait, wait_timeout: 90s}\n", env={})
    assert cfg.warnings == (
        "routes[0] ('a').wait_timeout: 90s is longer than ttl (1m): a held retry can "
        "outwait the key's window",)


def test_a_lease_longer_than_the_window_is_an_error():
    """lock_timeout longer than ttl is refused (issue #17): a lease ends within its window."""
    assert problems(one_route("ttl: 1m\nlock_timeout: 2m")) == [
        "routes[0].lock_timeout: 2m is longer than ttl (1m): a claim's lease must end "
        "within its key's window"]


def test_a_missing_upstream_is_a_warning_not_a_silent_default():
    """No upstream.url: the config loads, with a warning saying where requests go."""
    assert loads("routes: []\n", env={}).warnings == (
        "upstream.url: not set; requests go to the default http://127.0.0.1:9000",)
    assert loads(UP, env={}).warnings == ()
