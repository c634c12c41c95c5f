"""Pure: read a request's idempotency key, its tenant scope and its fingerprint.

Nothing here touches a socket; the flow hands in the parts of the request it needs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs

from proxy.config import Route, TenantMode
from proxy.errors import KeyMalformed, KeyMissing

MAX_KEY_LENGTH = 255


def parse_key_value(raw: str, *, source: str) -> str:
    """Validate one key: a bare token or an RFC 8941 sf-string; 1-255 printable ASCII."""
    value = raw.strip(" \t")
    if value.startswith('"'):
        value = _parse_sf_string(value, source=source)
    if not value:
        raise KeyMalformed(f"The {source} is empty.")
    if len(value) > MAX_KEY_LENGTH:
        raise KeyMalformed(f"The {source} is {len(value)} characters long; "
                           f"at most {MAX_KEY_LENGTH} are allowed.")
    if not all(" " <= c <= "~" for c in value):
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


def key_from_body(body: bytes, content_type: str, *, pointers: Sequence[str],
                  bucket: int | None) -> str | None:
    """A content-derived key: SHA-256 of the canonical JSON of the selected values.

    JSON bodies are addressed by RFC 6901 pointers; form bodies by field name (the pointer
    without its leading '/'). Returns None when any selected value is absent.
    """
    values: list[object] = []
    if content_type.startswith("application/x-www-form-urlencoded"):
        form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
        for p in pointers:
            got = form.get(p.lstrip("/"))
            if got is None:
                return None
            values.append(got)
    else:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        for p in pointers:
            found, value = resolve_pointer(doc, p)
            if not found:
                return None
            values.append(value)
    material = canonical_json(values)
    if bucket is not None:
        material += f"|bucket:{bucket}"
    return "body:" + hashlib.sha256(material.encode()).hexdigest()


def resolve_pointer(doc: object, pointer: str) -> tuple[bool, object]:
    """RFC 6901: '' is the whole document; '~1' is '/', '~0' is '~'."""
    if pointer == "":
        return True, doc
    node = doc
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


def canonical_json(value: object) -> str:
    """Key order and whitespace do not matter; numbers and strings keep their value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tenant_of(route: Route, headers: Mapping[str, str]) -> str:
    """A hash naming the tenant; raw credentials are never stored or logged."""
    if route.tenant.mode is TenantMode.NONE:
        return "-"
    value = headers.get(route.tenant.header, "")
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def scope_of(route: Route, tenant: str) -> str:
    """Keys only ever match inside route name + tenant."""
    return f"{route.name}:{tenant}"


def fingerprint(route: Route, *, method: str, path: str, query: str, body: bytes,
                headers: Mapping[str, str]) -> bytes:
    """SHA-256 over method, path, query and body (the parts the route counts)."""
    h = hashlib.sha256()
    for part in (method, path, query if route.fingerprint.query else ""):
        h.update(part.encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    for name in route.fingerprint.headers:
        h.update(f"{name.lower()}:{headers.get(name, '')}".encode("utf-8", "surrogateescape"))
        h.update(b"\x00")
    if route.fingerprint.body:
        h.update(body)
    return h.digest()


def require(key: str | None, route: Route, *, what: str) -> str | None:
    """Apply `require_key`: no key on a route that needs one is a 400."""
    if key is None and route.require_key:
        raise KeyMissing(f"Route {route.name!r} requires {what}.")
    return key
