"""Pure key handling: header values, limits, JSON pointers, canonical JSON, body keys,
tenants and the fingerprint's parts. No sockets, no database."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from multidict import CIMultiDict

from proxy import keys
from proxy.config import Fingerprint, KeySource, Route, Tenant, TenantMode
from proxy.errors import KeyMalformed, KeyMissing
from proxy.http.routing import PathPattern
from proxy.sealing import Sealer

SEALER = Sealer(keys=(), installation_secret=b"t" * 32)
TENANT_HASH, BODY_HASH = SEALER.tenant_hash, SEALER.body_key

JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


def body_route(*pointers: str, require: bool = True, bucket: float | None = None,
               raw: bool = False) -> Route:
    return Route(name="r", methods=frozenset({"POST"}), path=PathPattern.compile("/r"),
                 key=KeySource(header=None, body=pointers, bucket=bucket, raw=raw),
                 require_key=require)


def body_key(route: Route, body: bytes | str, content_type: str = JSON,
             now: float = 0.0) -> str | None:
    data = body.encode() if isinstance(body, str) else body
    return keys.body_key(route, data, content_type=content_type, now=now, keyed=BODY_HASH)


# --- header values: bare tokens and RFC 8941 sf-strings --------------------------------

@pytest.mark.parametrize(("raw", "key"), [
    ("abc", "abc"),
    ("  abc\t", "abc"),                     # OWS around a field value is not part of it
    ('"abc"', "abc"),
    ('"a\\"b"', 'a"b'),
    ('"a\\\\b"', "a\\b"),
    ('"a b"', "a b"),
    ("order-1834:retry/2", "order-1834:retry/2"),
])
def test_header_value_is_token_or_sf_string(raw: str, key: str) -> None:
    """A bare token and the sf-string spelling of the same value give the same key."""
    assert keys.parse_key_value(raw, source="Idempotency-Key header") == key


@pytest.mark.parametrize(("raw", "reason"), [
    ("", "empty"),
    ('""', "empty"),
    ('"abc', "no closing quote"),
    ('"abc"x', "after its closing quote"),
    ('"a\\nb"', "not a valid quoted string"),   # only \" and \\ are escapes
    ('"abc\\', "not a valid quoted string"),
    ("a" * 256, "256 characters long"),
    ("caf\u00e9", "printable ASCII"),
    ("a\x01b", "printable ASCII"),
    ('"a\tb"', "printable ASCII"),
])
def test_malformed_header_values_are_refused(raw: str, reason: str) -> None:
    """Empty, unterminated, over 255 characters or not printable ASCII: 400 key-malformed."""
    with pytest.raises(KeyMalformed, match=reason):
        keys.parse_key_value(raw, source="Idempotency-Key header")


def test_255_characters_is_the_limit() -> None:
    """Exactly 255 printable characters is a valid key; the limit is inclusive."""
    assert keys.parse_key_value("k" * 255, source="h") == "k" * 255
    assert keys.parse_key_value('"' + "k" * 255 + '"', source="h") == "k" * 255


def test_header_lines() -> None:
    """No header line is no key; two lines are ambiguous and refused."""
    assert keys.key_from_headers([], header="Idempotency-Key") is None
    assert keys.key_from_headers(["a"], header="Idempotency-Key") == "a"
    with pytest.raises(KeyMalformed, match="2 Idempotency-Key headers"):
        keys.key_from_headers(["a", "a"], header="Idempotency-Key")


def test_path_keys_are_not_parsed_as_sf_strings() -> None:
    """A path parameter is taken as routed: `"42"` (quotes included) is not key 42."""
    route = Route(name="o", methods=frozenset({"PUT"}), path=PathPattern.compile("/o/{id}"),
                  key=KeySource(header=None, path="id"))

    def read(value: str) -> str | None:
        return keys.read_key(route, headers={}, params={"id": value}, body=None, now=0,
                             keyed=BODY_HASH)

    assert read("42") == "42"
    assert read('"42"') == '"42"'
    with pytest.raises(KeyMalformed, match="path parameter"):
        read("\u00e9t\u00e9")


# --- RFC 6901 pointers ------------------------------------------------------------------

RFC6901_DOC = json.loads(r"""{"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3,
    "g|h": 4, "i\\j": 5, "k\"l": 6, " ": 7, "m~n": 8}""")


@pytest.mark.parametrize(("pointer", "value"), [   # RFC 6901 §5, verbatim
    ("", RFC6901_DOC), ("/foo", ["bar", "baz"]), ("/foo/0", "bar"), ("/", 0),
    ("/a~1b", 1), ("/c%d", 2), ("/e^f", 3), ("/g|h", 4), ("/i\\j", 5), ('/k"l', 6),
    ("/ ", 7), ("/m~0n", 8),
])
def test_pointers_resolve_as_rfc_6901_says(pointer: str, value: object) -> None:
    """Every example of RFC 6901 §5 resolves to the value the RFC gives."""
    assert keys.resolve_pointer(RFC6901_DOC, pointer) == (True, value)


@pytest.mark.parametrize("pointer", ["/nope", "/foo/2", "/foo/01", "/foo/-", "/foo/\u00b2",
                                     "/foo/0/x", "/a/b"])
def test_absent_pointers_are_not_found(pointer: str) -> None:
    """Missing members, out-of-range or non-canonical indexes: not found, never an error."""
    assert keys.resolve_pointer(RFC6901_DOC, pointer) == (False, None)


# --- canonical JSON -------------------------------------------------------------------------

def canon(text: str) -> str:
    return keys.canonical_json(keys.parse_json(text.encode()))


def test_canonical_json_ignores_member_order_and_whitespace() -> None:
    """Key order and whitespace do not matter; array order does."""
    assert canon('{"b": [1, {"y": 2, "x": 1}], "a": null}') == \
        canon('{"a":null,"b":[1,{"x":1,"y":2}]}')
    assert canon("[1, 2]") != canon("[2, 1]")


@pytest.mark.parametrize(("a", "b"), [
    ("1", "1.0"), ("1", "1e0"), ("1", "10e-1"), ("100", "1E2"), ("0", "-0"), ("0", "0.000"),
    ('"\u00e9"', '"\\u00e9"'), ('"/"', '"\\/"'),
])
def test_canonical_json_equal_values_are_written_alike(a: str, b: str) -> None:
    """Two spellings of one JSON value canonicalise to the same text."""
    assert canon(a) == canon(b)


@pytest.mark.parametrize(("a", "b"), [
    ("9007199254740992", "9007199254740993"),           # beyond a double: still distinct
    ("0.1", "0.10000000000000000001"),
    ("1", '"1"'), ("true", "1"), ("null", "0"), ('""', "null"),
])
def test_canonical_json_different_values_stay_different(a: str, b: str) -> None:
    """Numbers are compared exactly (no float rounding), and types never blur."""
    assert canon(a) != canon(b)


@pytest.mark.parametrize("text", ['{"a": 1, "a": 2}', "NaN", "[Infinity]", "{", "",
                                  "[1] [2]"])
def test_ambiguous_or_invalid_json_is_refused(text: str) -> None:
    """Duplicate member names, NaN/Infinity and non-JSON are refused, not guessed at."""
    with pytest.raises(ValueError):
        keys.parse_json(text.encode())


def _shuffled_spelling(value: object, rng: random.Random) -> str:
    """The same JSON value written with random member order and whitespace."""
    ws = lambda: rng.choice(["", " ", "\n", "\t "])  # noqa: E731
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return "{" + ",".join(f"{ws()}{json.dumps(k)}{ws()}:{ws()}"
                              f"{_shuffled_spelling(v, rng)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + _shuffled_spelling(v, rng) + ws() for v in value) + "]"
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["obj", "list", "str", "int", "float", "lit"] if depth < 4 else
                      ["str", "int", "float", "lit"])
    if kind == "obj":
        return {f"k{rng.randrange(50)}\u00e9": _random_value(rng, depth + 1)
                for _ in range(rng.randrange(5))}
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    if kind == "str":
        return "".join(rng.choice('ab"\\/\u00e9\u2028\n') for _ in range(rng.randrange(6)))
    if kind == "int":
        return rng.randrange(-10**20, 10**20)
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    return rng.choice([True, False, None])


def test_canonical_json_is_spelling_independent_over_random_documents() -> None:
    """Over 300 random documents, every re-spelling canonicalises to the same text."""
    rng = random.Random(20240605)
    for _ in range(300):
        value = _random_value(rng)
        first = canon(_shuffled_spelling(value, rng))
        assert canon(_shuffled_spelling(value, rng)) == first
        assert canon(json.dumps(value)) == first


# --- body keys ------------------------------------------------------------------------------

def test_body_key_is_printable_bounded_and_order_independent() -> None:
    """The key is `body:` + 64 hex digits, whatever the order or spacing of the body."""
    route = body_route("/to", "/template")
    a = body_key(route, '{"to": "x@example.com", "template": "welcome", "n": 1}')
    b = body_key(route, '{ "n" : 2,\n "template":"welcome", "to":"x@example.com"}')
    assert a == b
    assert a is not None and a.startswith("body:") and len(a) == 69
    keys.check_key(a, source="body key")
    assert body_key(route, '{"to": "y@example.com", "template": "welcome"}') != a


def test_body_key_selects_values_not_names() -> None:
    """Swapping two selected values gives a different key."""
    route = body_route("/a", "/b")
    assert body_key(route, '{"a": 1, "b": 2}') != body_key(route, '{"a": 2, "b": 1}')


def test_whole_body_pointer() -> None:
    """The pointer '' keys on the whole (canonical) document."""
    route = body_route("")
    assert body_key(route, '{"a":1,"b":2}') == body_key(route, '{"b": 2, "a": 1}')
    assert body_key(route, '{"a":1,"b":2}') != body_key(route, '{"a":1,"b":3}')


@pytest.mark.parametrize(("body", "content_type", "why"), [
    ('{"to": "x"}', JSON, "no value at /template"),
    ("", JSON, "has no body"),
    ("hello", "text/plain", "not JSON or form-encoded (Content-Type: text/plain"),
    ("\xff\xfe", "", "Content-Type: none"),
    ('{"to": 1, "to": 2, "template": 3}', JSON, "duplicate member name"),
    ("[" * 100_000 + "]" * 100_000, JSON, "nested too deeply"),
    ("to=x", FORM, "no field 'template'"),
])
def test_body_without_a_key_is_400_on_require_key_routes(body: str, content_type: str,
                                                        why: str) -> None:
    """No key in the body of a require_key route: 400 key-missing saying why (never 500)."""
    with pytest.raises(KeyMissing, match=why.replace("(", r"\(")) as info:
        body_key(body_route("/to", "/template"), body.encode("latin-1"), content_type)
    assert "/to, /template" in info.value.detail


def test_body_without_a_key_is_unguarded_without_require_key() -> None:
    """Without require_key, a body that yields no key leaves the request unguarded."""
    route = body_route("/to", require=False)
    assert body_key(route, "not json", "text/plain") is None
    assert body_key(route, '{"from": "x"}') is None


def test_form_fields_are_pointers_without_the_slash() -> None:
    """Form bodies key on field names; order of distinct fields does not matter."""
    route = body_route("/to", "/a~1b")
    a = body_key(route, "to=x%40example.com&a%2Fb=1", FORM)
    assert a is not None
    assert body_key(route, "a%2Fb=1&to=x@example.com", FORM + "; charset=utf-8") == a
    assert body_key(route, "to=x%40example.com&a%2Fb=2", FORM) != a


def test_form_and_json_with_equal_values_are_different_keys() -> None:
    """A form field and a JSON member with the same text never share a key."""
    route = body_route("/to")
    assert body_key(route, "to=x", FORM) != body_key(route, '{"to": ["x"]}')


def test_bucket_folds_the_clock_window_into_the_key() -> None:
    """Same content in the same bucket: one key; the next bucket: a new key."""
    route = body_route("/to", bucket=86400)
    day = 19_000 * 86400.0
    first = body_key(route, '{"to": "x"}', now=day + 1)
    assert body_key(route, '{"to": "x"}', now=day + 86399) == first
    assert body_key(route, '{"to": "x"}', now=day + 86400) != first
    assert body_key(body_route("/to"), '{"to": "x"}') != first


def test_raw_key_is_the_value_itself() -> None:
    """`raw: true`: a string or integer value is the key, validated like a header key."""
    route = body_route("/id", raw=True)
    assert body_key(route, '{"id": "evt_1NG8Du2eZvKYlo2C", "object": "event"}') == \
        "evt_1NG8Du2eZvKYlo2C"
    assert body_key(route, '{"id": 12345}') == "12345"
    assert body_key(route, "id=evt_9", FORM) == "evt_9"


@pytest.mark.parametrize(("body", "why"), [
    ('{"id": {"x": 1}}', "not a string or an integer"),
    ('{"id": 1.5}', "not a string or an integer"),
    ('{"id": true}', "not a string or an integer"),
    ('{"id": ""}', "empty"),
    ('{"id": "' + "e" * 256 + '"}', "256 characters"),
    ('{"id": "evt\\n1"}', "printable ASCII"),
])
def test_unusable_raw_keys_are_400(body: str, why: str) -> None:
    """A raw key that is not a printable string of 1-255 characters is key-malformed."""
    with pytest.raises(KeyMalformed, match=why):
        body_key(body_route("/id", raw=True), body)


# --- tenant and scope -----------------------------------------------------------------------

def test_tenant_is_a_hash_never_the_credential() -> None:
    """The tenant is a hash of Authorization (or a named header), or '-' for none."""
    route = body_route("/x")
    t = keys.tenant_of(route, CIMultiDict({"Authorization": "Bearer sk_live_secret"}),
                       keyed=TENANT_HASH)
    assert "sk_live" not in t and len(t) == 32
    assert t != keys.tenant_of(route, CIMultiDict({"Authorization": "Bearer other"}),
                             keyed=TENANT_HASH)
    by_header = replace(route, tenant=Tenant(mode=TenantMode.HEADER, header="X-Api-Key"))
    assert keys.tenant_of(by_header, CIMultiDict({"x-api-key": "k1"}), keyed=TENANT_HASH) != \
        keys.tenant_of(by_header, CIMultiDict({"X-Api-Key": "k2"}), keyed=TENANT_HASH)
    none = replace(route, tenant=Tenant(mode=TenantMode.NONE, header=""))
    assert keys.tenant_of(none, CIMultiDict({"Authorization": "a"}), keyed=TENANT_HASH) == "-"
    assert keys.scope_of(none, "-") == "r:-"


# --- fingerprint ------------------------------------------------------------------------

_DEFAULT_FP = Fingerprint()


def fp(fingerprint: Fingerprint = _DEFAULT_FP, *, method: str = "POST", path: str = "/p",
       query: str = "", body: bytes = b'{"a": 1, "b": 2}', content_type: str = JSON,
       headers: dict[str, str] | None = None) -> bytes:
    route = replace(body_route("/a"), fingerprint=fingerprint)
    return keys.fingerprint(route, method=method, path=path, query=query, body=body,
                            headers=CIMultiDict(headers or {}), content_type=content_type)


def test_fingerprint_counts_method_path_query_and_body_by_default() -> None:
    """By default any change in method, path, query or body is a different fingerprint."""
    base = fp()
    assert len(base) == 32 and fp() == base
    assert fp(method="PUT") != base
    assert fp(path="/q") != base
    assert fp(query="x=1") != base
    assert fp(body=b'{"a": 1, "b": 3}') != base
    assert fp(body=b'{"b": 2, "a": 1}') != base   # raw bytes unless canonical_json
    assert fp(headers={"X-Other": "1"}) == base   # headers count only when named


def test_fingerprint_parts_do_not_run_together() -> None:
    """Moving bytes between parts changes the fingerprint (parts are length-prefixed)."""
    assert fp(path="/ab", query="") != fp(path="/a", query="b")
    assert fp(query="", body=b"x") != fp(query="x", body=b"")


def test_fingerprint_without_query_or_body() -> None:
    """`query: false` and `body: false` take those parts out."""
    no_query = Fingerprint(query=False)
    assert fp(no_query, query="a=1") == fp(no_query, query="a=2")
    assert fp(no_query, body=b"1") != fp(no_query, body=b"2")
    no_body = Fingerprint(body=False)
    assert fp(no_body, body=b"1") == fp(no_body, body=b"2")
    assert fp(no_body, body=b"") != fp(Fingerprint(), body=b"")


def test_fingerprint_counts_named_headers_only() -> None:
    """Named headers count (any case); absent differs from empty; others never count."""
    named = Fingerprint(headers=("X-Account",))
    base = fp(named, headers={"x-account": "acct_1"})
    assert fp(named, headers={"X-ACCOUNT": "acct_1", "Date": "now"}) == base
    assert fp(named, headers={"X-Account": "acct_2"}) != base
    assert fp(named, headers={}) != fp(named, headers={"X-Account": ""})


def test_canonical_json_fingerprint_ignores_order_and_whitespace() -> None:
    """`canonical_json: true`: bodies differing in member order or spacing match."""
    canon_fp = Fingerprint(canonical_json=True)
    assert fp(canon_fp, body=b'{"a": 1, "b": 2}') == fp(canon_fp, body=b'{"b":2,\n"a":1.0}')
    assert fp(canon_fp, body=b'{"a": 1, "b": 2}') != fp(canon_fp, body=b'{"a": 1, "b": 3}')


def test_non_json_bodies_keep_their_raw_fingerprint() -> None:
    """canonical_json on a body that is not JSON hashes its bytes (no false matches)."""
    canon_fp = Fingerprint(canonical_json=True)
    assert fp(canon_fp, body=b"a=1&b=2", content_type=FORM) != \
        fp(canon_fp, body=b"b=2&a=1", content_type=FORM)
    assert fp(canon_fp, body=b"{nope") != fp(canon_fp, body=b"{nope ")
    # JSON mislabelled as text/plain (common with legacy clients) is still canonicalised
    assert fp(canon_fp, body=b"{}", content_type="text/plain") == \
        fp(canon_fp, body=b"{ }", content_type="text/plain")


def test_ignored_fields_do_not_count() -> None:
    """`ignore` pointers are dropped before hashing; every other field still counts."""
    ignoring = Fingerprint(ignore=("/timestamp", "/meta/trace", "/items/0"),
                           canonical_json=True)
    a = fp(ignoring, body=b'{"amount": 5, "timestamp": 1, "meta": {"trace": "t1", "v": 1},'
                          b' "items": ["x", "y"]}')
    b = fp(ignoring, body=b'{"timestamp": 2, "amount": 5, "meta": {"v": 1, "trace": "t2"},'
                          b' "items": ["z", "y"]}')
    assert a == b
    assert fp(ignoring, body=b'{"amount": 5, "meta": {"v": 1}, "items": ["q", "y"]}') == a
    assert fp(ignoring, body=b'{"amount": 6, "timestamp": 1, "meta": {"trace": "t1", '
                             b'"v": 1}, "items": ["x", "y"]}') != a
    assert fp(ignoring, body=b'{"amount": 5, "meta": {"v": 2}, "items": ["x", "y"]}') != a


def test_body_keys_are_keyed_by_the_installation_secret():
    """The same body gives another key under another installation secret, and never the
    plain SHA-256 of the selected values: a stored key does not confirm a guessed body."""
    import hashlib

    route = body_route("/to")
    data = b'{"to": "x@example.com"}'
    mine = keys.body_key(route, data, content_type=JSON, now=0.0, keyed=BODY_HASH)
    other = Sealer(keys=(), installation_secret=b"u" * 32).body_key
    assert keys.body_key(route, data, content_type=JSON, now=0.0, keyed=other) != mine
    plain = hashlib.sha256(b'json:["x@example.com"]').hexdigest()
    assert mine is not None and mine.startswith("body:") and plain not in mine
