"""The value parsers of a route's fields (config/routes.py): each takes the YAML value
and returns the parsed one, or raises ValueError with the message the field's problem
shows."""

from __future__ import annotations

import re
from collections.abc import Callable

from proxy.config.schema import SAFE_METHODS
from proxy.config.values import parse_header_name, str_
from proxy.paths import PathPattern

# Response headers the proxy may not take over for its replay, expiry and omitted markers.
RESERVED_RESPONSE_HEADERS = frozenset({
    "connection", "content-encoding", "content-length", "content-type", "date",
    "keep-alive", "location", "server", "set-cookie", "te", "trailer",
    "transfer-encoding", "upgrade",
})
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token (methods)


def parse_route_name(value: object) -> str:
    text = str_(value)
    if not text or len(text) > 100 or any(c in text for c in ":\x00\n"):
        raise ValueError(f"{value!r} is not a route name (1-100 characters, no ':')")
    return text


def parse_pattern(*, trailing_slash: bool, case_insensitive: bool
             ) -> Callable[[object], PathPattern]:
    def parse(value: object) -> PathPattern:
        return PathPattern.compile(str_(value), trailing_slash=trailing_slash,
                                   case_insensitive=case_insensitive)
    return parse


def parse_methods(value: object) -> frozenset[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or \
            not all(isinstance(m, str) and TOKEN.match(m) for m in items):
        raise ValueError(f"{value!r} is not a list of methods like [POST, PUT]")
    methods = frozenset(m.upper() for m in items)
    safe = sorted(methods & SAFE_METHODS)
    if safe:
        verb = "is a safe method" if len(safe) == 1 else "are safe methods"
        raise ValueError(f"{', '.join(safe)} {verb} and never guarded")
    return methods


STATUS_CLASS = re.compile(r"^[1-5][xX]{2}$")  # 4xx: every status from 400 to 499


def parse_statuses(value: object) -> frozenset[int | str]:
    """HTTP statuses (429) and classes ('5xx', kept lower-case) in one set: decide.py
    tells them apart, an integer being more specific than its class."""
    if not isinstance(value, list) or not all(_is_status(s) for s in value):
        raise ValueError(f"{value!r} is not a list of HTTP statuses like [429, 503] "
                         "or classes like [5xx]")
    return frozenset(s.lower() if isinstance(s, str) else s for s in value)


def _is_status(s: object) -> bool:
    if isinstance(s, str):
        return bool(STATUS_CLASS.match(s))
    return isinstance(s, int) and not isinstance(s, bool) and 100 <= s <= 599


def parse_store_statuses(value: object) -> frozenset[int | str]:
    statuses = parse_statuses(value)
    if not statuses:  # every answer released: every retry would run the request again
        raise ValueError("[] stores no answer, so every retry would run again; list what "
                         "is stored, e.g. [2xx]")
    return statuses


MISMATCH_STATUSES = (400, 409, 422)


def parse_mismatch_status(value: object) -> int:
    # 422 is the IETF draft's answer; some clients read 422 as "fix the body, do not
    # retry" and want 409 (conflict) or 400 instead (draft issue #42).
    if isinstance(value, bool) or value not in MISMATCH_STATUSES:
        raise ValueError(f"{value!r} is not one of: 400, 409, 422")
    assert isinstance(value, int)
    return value


STALE_STATUSES = (400, 409, 412, 422)


def parse_stale_status(value: object) -> int:
    # 412 is what OASIS repeatability (and Azure Communication Services) answer; a
    # client that treats 412 as "retry with fresh preconditions" may want 409 or 400.
    if isinstance(value, bool) or value not in STALE_STATUSES:
        raise ValueError(f"{value!r} is not one of: 400, 409, 412, 422")
    assert isinstance(value, int)
    return value


def parse_pointer(value: object) -> str:
    # RFC 6901 §3: '' or '/'-separated tokens; '~' only as '~0' or '~1'.
    if not isinstance(value, str) or (value and not value.startswith("/")) or \
            re.search(r"~(?![01])", value):
        raise ValueError(f"{value!r} is not a JSON pointer (RFC 6901: '' or /a/b, "
                         "with ~0 for ~ and ~1 for /)")
    return value


def parse_pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{value!r} is not a list of JSON pointers like [/to, /template]")
    return tuple(parse_pointer(p) for p in value)


def parse_ignore_pointers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of JSON pointers like [/timestamp]")
    pointers = tuple(parse_pointer(p) for p in value)
    if "" in pointers:
        raise ValueError("'' would ignore the whole body; set fingerprint.body: false")
    return pointers


def parse_header_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError(f"{value!r} is not a list of header names")
    return tuple(parse_header_name(h) for h in value)


def parse_response_header(value: object) -> str:
    name = parse_header_name(value)
    if name.lower() in RESERVED_RESPONSE_HEADERS:
        raise ValueError(f"{name!r} is a header the proxy or the upstream sets itself")
    return name


def positive(parse: Callable[[object], float]) -> Callable[[object], float]:
    def check(value: object) -> float:
        result = parse(value)
        if result <= 0:
            raise ValueError(f"{value!r} must be more than zero")
        return result
    return check
