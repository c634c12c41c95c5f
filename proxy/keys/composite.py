"""A key made of several values: `key: {headers: [ce-source, ce-id]}`, and, with
`key.body` beside it, the same values from the body when the headers are absent (a
CloudEvent in structured mode carries in its JSON what binary mode sends as headers).

    ce-source: /mycontext   ce-id: A234   ->  10:/mycontext4:A234
    {"source": "/mycontext", "id": "A234"} ->  10:/mycontext4:A234   (the same key)

Each value is length-prefixed, so `a|b` + `c` never equals `a` + `b|c`, and the key
stays readable (`idemproxy keys show` finds it). A key that would be longer than 255
characters, or that is not printable ASCII, is an HMAC of it under the installation
secret instead (`multi:<hex>`); a readable one starts with a digit, so the two never meet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from proxy.config import Route
from proxy.errors import KeyMalformed, KeyMissing
from proxy.keys import sources
from proxy.keys.sources import MAX_KEY_LENGTH, NoBodyValue, header_values, require, select


def read_key(route: Route, *, headers: Mapping[str, str], params: Mapping[str, str],
             body: bytes | None, now: float, keyed: Callable[[bytes], str]) -> str | None:
    """sources.read_key, and `key.headers` (this module) beside its sources. With
    `key.headers` and `key.body`, the body is needed (the flow reads it first)."""
    if route.key.headers:
        return composite_key(route, headers=headers, body=body, keyed=keyed)
    return sources.read_key(route, headers=headers, params=params, body=body, now=now,
                            keyed=keyed)


def composite_key(route: Route, *, headers: Mapping[str, str], body: bytes | None,
                  keyed: Callable[[bytes], str]) -> str | None:
    """The key from every header of `key.headers`, else (none of them sent) from the
    body's values at `key.body`, else None (a 400 on `require_key` routes). Some of the
    headers but not all is a 400: the request names half an event."""
    src = route.key
    values = _from_headers(src.headers, headers)
    if values is None and src.body:
        values = _from_body(route, body, content_type=headers.get("Content-Type", ""))
    if values is None:
        return require(None, route, what=f"the headers {', '.join(src.headers)}")
    return join(values, keyed=keyed)


def join(values: Sequence[str], *, keyed: Callable[[bytes], str]) -> str:
    """The values length-prefixed; their HMAC when that is no usable key as it stands."""
    material = "".join(f"{len(v)}:{v}" for v in values)
    if len(material) <= MAX_KEY_LENGTH and material.isascii() and material.isprintable():
        return material
    return "multi:" + keyed(material.encode("utf-8", "surrogateescape"))


def _from_headers(names: Sequence[str], headers: Mapping[str, str]) -> list[str] | None:
    found: list[str] = []
    for name in names:
        lines = header_values(headers, name)
        if len(lines) > 1:
            raise KeyMalformed(f"The request carries {len(lines)} {name} headers; send one.")
        if lines:
            value = lines[0].strip(" \t")
            if not value:
                raise KeyMalformed(f"The {name} header is empty.")
            found.append(value)
    if not found:
        return None
    if len(found) != len(names):
        raise KeyMalformed(f"The key is made of the headers {', '.join(names)}; the "
                           "request carries only some of them.")
    return found


def _from_body(route: Route, body: bytes | None, *, content_type: str) -> list[str] | None:
    pointers = route.key.body
    try:
        _, values = select(body or b"", content_type=content_type, pointers=pointers)
    except NoBodyValue as exc:
        if not route.require_key:
            return None
        raise KeyMissing(f"Route {route.name!r} takes its key from the headers "
                         f"{', '.join(route.key.headers)} or the body ({', '.join(pointers)}), "
                         f"but the request has none of the headers and {exc}.") from None
    out = []
    for pointer, value in zip(pointers, values, strict=True):
        if isinstance(value, list) and len(value) == 1:  # a form field sent once
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise KeyMalformed(f"The body value at {pointer} is not a non-empty string or "
                               "an integer, so it cannot be part of the idempotency key.")
        out.append(str(value))
    return out
