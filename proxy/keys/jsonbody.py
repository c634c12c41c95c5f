"""Pure: request bodies as data — strict JSON, form fields, RFC 6901 pointers, and one
canonical text per JSON value (for body keys and `fingerprint.canonical_json`)."""

from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from urllib.parse import parse_qs

FORM = "application/x-www-form-urlencoded"
_INDEX = re.compile(r"^(0|[1-9][0-9]*)$")  # RFC 6901 §4: array indexes, no leading zeros


class _Dropped:
    """Marks a value removed by `fingerprint.ignore`; canonical_json leaves it out."""


DROPPED = _Dropped()


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def parse_json(body: bytes) -> object:
    """One JSON text, exactly: numbers kept exact (Decimal); NaN, Infinity, numbers past
    Decimal's exponent range and duplicate member names refused with ValueError (a
    duplicate means different things to different parsers)."""
    return json.loads(body, parse_float=_decimal, parse_constant=_no_constant,
                      object_pairs_hook=_unique_members)


def _decimal(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:  # an exponent past ±999999999999999999: an ArithmeticError
        raise ValueError("a number is out of range") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, object]]) -> dict[str, object]:
    doc: dict[str, object] = {}
    for name, value in pairs:
        if name in doc:
            raise ValueError(f"duplicate member name {name!r}")
        doc[name] = value
    return doc


def parse_form(body: bytes) -> dict[str, list[str]]:
    """application/x-www-form-urlencoded; undecodable bytes kept distinct, not replaced."""
    return parse_qs(body.decode("utf-8", "surrogateescape"), keep_blank_values=True,
                    encoding="utf-8", errors="surrogateescape")


def unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def resolve_pointer(doc: object, pointer: str) -> tuple[bool, object]:
    """RFC 6901: '' is the whole document; '~1' is '/', '~0' is '~'."""
    if pointer == "":
        return True, doc
    node = doc
    for token in pointer[1:].split("/"):
        token = unescape(token)
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and _INDEX.match(token) and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


def drop(doc: object, pointer: str) -> None:
    """Mark the value at `pointer` as ignored (absent pointers are fine: nothing to drop)."""
    head, _, last = pointer.rpartition("/")
    found, parent = resolve_pointer(doc, head)
    token = unescape(last)
    if found and isinstance(parent, dict) and token in parent:
        parent[token] = DROPPED
    elif found and isinstance(parent, list) and _INDEX.match(token) and \
            int(token) < len(parent):
        parent[int(token)] = DROPPED


def canonical_json(value: object) -> str:
    """One text per JSON value: members sorted, no whitespace, strings ASCII-escaped, and
    numbers by exact value (1, 1.0 and 10e-1 are alike; no float rounding, unlike RFC 8785).
    """
    out: list[str] = []
    _emit(value, out)
    return "".join(out)


def _emit(value: object, out: list[str]) -> None:
    if isinstance(value, dict):
        items = [(k, v) for k, v in sorted(value.items()) if v is not DROPPED]
        out.append("{")
        for i, (k, v) in enumerate(items):
            out.append(("," if i else "") + json.dumps(k) + ":")
            _emit(v, out)
        out.append("}")
    elif isinstance(value, list):
        out.append("[")
        for i, v in enumerate(x for x in value if x is not DROPPED):
            out.append("," if i else "")
            _emit(v, out)
        out.append("]")
    elif value is None or isinstance(value, (bool, str)):
        out.append(json.dumps(value))
    elif isinstance(value, (int, Decimal)):
        out.append(_number(value))
    else:
        raise TypeError(f"not a JSON value: {value!r}")


def _number(n: int | Decimal) -> str:
    sign, digits, exp = Decimal(n).as_tuple()
    assert isinstance(exp, int)  # NaN and Infinity never get here (parse_json)
    kept = list(digits)
    while len(kept) > 1 and kept[-1] == 0:
        kept.pop()
        exp += 1
    if kept == [0]:
        return "0"  # -0 and 0.000 too
    return f"{'-' if sign else ''}{''.join(map(str, kept))}e{exp}"
