"""What makes two requests the same: a SHA-256 over the method, the path and the parts
the route counts (query, chosen headers, the body raw or as canonical JSON)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from proxy.config import Route
from proxy.keys.jsonbody import FORM, canonical_json, drop, media_type, parse_json
from proxy.keys.sources import header_values


def fingerprint(route: Route, *, method: str, path: str, query: str, body: bytes,
                headers: Mapping[str, str], content_type: str = "") -> bytes:
    """SHA-256 over method, path and the parts the route counts (design §2).

    Each part is length-prefixed, so no two different requests run together into one
    byte string; an absent part differs from an empty one.
    """
    fp = route.fingerprint
    h = hashlib.sha256()
    _feed(h, method.encode())
    _feed(h, path.encode("utf-8", "surrogateescape"))
    _feed(h, query.encode("utf-8", "surrogateescape") if fp.query else None)
    for name in fp.headers:
        values = header_values(headers, name)
        _feed(h, name.lower().encode())
        _feed(h, "\n".join(values).encode("utf-8", "surrogateescape") if values else None)
    if not fp.body:
        _feed(h, None)
    elif fp.canonical_json and (canonical := _canonical_body(body, content_type, fp.ignore)):
        h.update(b"json")
        _feed(h, canonical)
    else:
        h.update(b"raw")
        _feed(h, body)
    return h.digest()


def _canonical_body(body: bytes, content_type: str, ignore: Sequence[str]) -> bytes | None:
    """The body as canonical JSON without the ignored values; None if it is not JSON."""
    if not body or media_type(content_type) == FORM:
        return None
    try:
        doc = parse_json(body)
        for pointer in ignore:
            drop(doc, pointer)
        return canonical_json(doc).encode("ascii")
    except (ValueError, RecursionError):
        return None


def _feed(h: hashlib._Hash, part: bytes | None) -> None:
    if part is None:
        h.update(b"-")
    else:
        h.update(b"%d:" % len(part))
        h.update(part)
