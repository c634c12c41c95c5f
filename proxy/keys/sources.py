"""Pure: read a request's idempotency key, its tenant scope and its fingerprint.

Nothing here touches a socket or a clock; the flow hands in the parts of the request it
needs (and the database's time, for bucketed body keys).

    key.header  Idempotency-Key: "abc"       -> abc    (bare token or RFC 8941 sf-string)
    key.path    PUT /orders/{order_id}       -> 42     (the parameter as routed)
    key.body    {"to": .., "template": ..}   -> body:<HMAC-SHA-256 of the canonical values>
    key.raw     {"id": "evt_1"}              -> evt_1  (one value, used as it is)

Every key is 1-255 printable ASCII characters, whatever its source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import cast

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy, MultiMapping

from proxy.config import Route
from proxy.errors import KeyMalformed, KeyMissing
from proxy.keys.jsonbody import (
    FORM,
    canonical_json,
    media_type,
    parse_form,
    parse_json,
    resolve_pointer,
    unescape,
)

__all__ = [
    "MAX_KEY_LENGTH", "NoBodyValue", "body_key", "canonical_json", "check_key",
    "header_values", "key_from_headers", "parse_json", "parse_key_value", "read_key",
    "require", "resolve_pointer", "select",
]


MAX_KEY_LENGTH = 255


# --- the key ---------------------------------------------------------------------------

def read_key(route: Route, *, headers: Mapping[str, str], params: Mapping[str, str],
             body: bytes | None, now: float, keyed: Callable[[bytes], str]) -> str | None:
    """The route's key for this request, or None when it has none and may go unguarded.

    Raises KeyMissing (no key on a `require_key` route) or KeyMalformed (a key that is
    there but unusable). `body` is needed only for body keys; `now` (the database clock,
    in seconds) only for bucketed ones; `keyed` (Sealer.body_key) hashes body keys.
    """
    src = route.key
    if src.header is not None:
        key = key_from_headers(header_values(headers, src.header), header=src.header)
        return require(key, route, what=f"an {src.header} header")
    if src.path is not None:
        return check_key(params[src.path], source=f"path parameter {{{src.path}}}")
    return body_key(route, body or b"", content_type=headers.get("Content-Type", ""),
                    now=now, keyed=keyed)


def parse_key_value(raw: str, *, source: str) -> str:
    """Validate one header key: a bare token or an RFC 8941 sf-string."""
    value = raw.strip(" \t")
    if value.startswith('"'):
        value = _parse_sf_string(value, source=source)
    return check_key(value, source=source)


def check_key(value: str, *, source: str) -> str:
    """A key is 1-255 printable ASCII characters (design §2); anything else is a 400."""
    if not value:
        raise KeyMalformed(f"The {source} is empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyMalformed(f"The {source} is {len(value)} characters long; "
                           f"at most {MAX_KEY_LENGTH} are allowed.")
    if not (value.isascii() and value.isprintable()):  # " " to "~", checked in C
        raise KeyMalformed(f"The {source} must be printable ASCII.")
    return value


def _parse_sf_string(value: str, *, source: str) -> str:
    # RFC 8941 §4.2.5: DQUOTE *( unescaped / "\" ( DQUOTE / "\" ) ) DQUOTE
    out: list[str] = []
    i = 1
    while i < len(value):
        c = value[i]
        if c == "\\":
            if i + 1 >= len(value) or value[i + 1] not in '"\\':
                raise KeyMalformed(f"The {source} is not a valid quoted string.")
            out.append(value[i + 1])
            i += 2
        elif c == '"':
            if i != len(value) - 1:
                raise KeyMalformed(f"The {source} has characters after its closing quote.")
            return "".join(out)
        else:
            out.append(c)
            i += 1
    raise KeyMalformed(f"The {source} has no closing quote.")


def key_from_headers(values: Sequence[str], *, header: str) -> str | None:
    """The key from the route's header; several header lines are ambiguous, so a 400."""
    if not values:
        return None
    if len(values) > 1:
        raise KeyMalformed(f"The request carries {len(values)} {header} headers; send one.")
    return parse_key_value(values[0], source=f"{header} header")


def require(key: str | None, route: Route, *, what: str) -> str | None:
    """Apply `require_key`: no key on a route that needs one is a 400."""
    if key is None and route.require_key:
        raise KeyMissing(f"Route {route.name!r} requires {what}.")
    return key


# --- keys from the body ----------------------------------------------------------------

class NoBodyValue(ValueError):
    """Why a body yields no key: no body, not JSON or form, or a pointer that is absent."""


def body_key(route: Route, body: bytes, *, content_type: str, now: float,
             keyed: Callable[[bytes], str]) -> str | None:
    """A content-derived key: a keyed hash (`keyed`: an HMAC under the installation
    secret, Sealer.body_key) of the selected values, canonicalised; or the raw value.

    A body that yields no key is a 400 on `require_key` routes, else None (unguarded).
    """
    src = route.key
    try:
        kind, values = select(body, content_type=content_type, pointers=src.body)
    except NoBodyValue as exc:
        if not route.require_key:
            return None
        raise KeyMissing(f"Route {route.name!r} takes its key from the request body "
                         f"({', '.join(src.body) or 'the whole body'}), but {exc}.") from None
    if src.raw:
        return _raw_key(values[0], pointer=src.body[0])
    material = f"{kind}:{canonical_json(values)}"
    if src.bucket is not None:  # the window the database clock is in, since the epoch
        material += f"|bucket:{src.bucket:g}:{int(now // src.bucket)}"
    return "body:" + keyed(material.encode("ascii"))


def select(body: bytes, *, content_type: str, pointers: Sequence[str]
           ) -> tuple[str, list[object]]:
    """("json" | "form", the value at each pointer); raises NoBodyValue saying why not.

    JSON bodies are addressed by RFC 6901 pointers; form bodies by field name (the pointer
    without its '/'; '' is the whole form) and give each field's list of values.
    """
    if not body:
        raise NoBodyValue("the request has no body")
    if media_type(content_type) == FORM:
        form = parse_form(body)
        return "form", [_form_field(form, p) for p in pointers]
    try:
        doc = parse_json(body)
    except (ValueError, RecursionError) as exc:
        raise NoBodyValue(f"the body is not JSON or form-encoded (Content-Type: "
                          f"{content_type or 'none'}; {_reason(exc)})") from None
    values = []
    for p in pointers:
        found, value = resolve_pointer(doc, p)
        if not found:
            raise NoBodyValue(f"the body has no value at {p}")
        values.append(value)
    return "json", values


def _form_field(form: dict[str, list[str]], pointer: str) -> object:
    if pointer == "":
        return form
    name = unescape(pointer[1:])
    if name not in form:
        raise NoBodyValue(f"the form body has no field {name!r}")
    return form[name]


def _raw_key(value: object, *, pointer: str) -> str:
    """`raw: true`: the value itself is the key: a string or an integer, validated."""
    if isinstance(value, list) and len(value) == 1:  # a form field sent once
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise KeyMalformed(f"The body value at {pointer} is not a string or an integer, "
                           "so it cannot be the idempotency key.")
    return check_key(str(value), source=f"body value at {pointer}")


def _reason(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


# --- header values (the key, the tenant and fingerprinted headers read them) ----------

_MULTIDICTS = frozenset({CIMultiDictProxy, CIMultiDict, MultiDictProxy, MultiDict})


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every line of a header (a multidict), or the one value of a plain mapping."""
    # The type first: isinstance against the MultiMapping ABC costs more than the rest
    # of this function, and it runs for the key, the tenant and fingerprinted headers.
    if type(headers) in _MULTIDICTS or isinstance(headers, MultiMapping):
        return list(cast("MultiMapping[str]", headers).getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]
