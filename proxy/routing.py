"""Pure route matching on the normalised path: one path, one meaning.

Guarded methods are matched on the request path normalised as RFC 3986 §6.2.2 says
(percent-encodings of unreserved characters decoded, other percent-encodings upper-cased,
dot segments removed) with repeated slashes merged, and the upstream receives exactly the
path that matched: the proxy and the upstream can never disagree on which resource a
guarded request names. `/v1/charges/`, `//v1/charges`, `/v1/./charges`,
`/v1/foo/../charges` and `/v1/%63harges` all name `/v1/charges` (Envoy's
`normalize_path` + `merge_slashes`, after CVE-2019-9901). A path parameter (`;x=1`) on
a path that then matches a route is refused: frameworks disagree on what it means.

Patterns: literal, `{param}` segments, trailing `*`. A trailing slash matches the same
route unless the route says `match.trailing_slash: strict`; `match.case_insensitive`
matches letters in any case (for upstreams that ignore it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from proxy.errors import BadRequest

if TYPE_CHECKING:
    from proxy.config import Route

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SLASHES = re.compile(r"/{2,}")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled path pattern. `/orders/{id}` binds one segment; `/files/*` any suffix."""

    text: str
    regex: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def compile(cls, text: str, *, trailing_slash: bool = False,
                case_insensitive: bool = False) -> PathPattern:
        """Compile `text`; raise ValueError with a reason when it is not a valid pattern.

        `trailing_slash`: the path with or without one trailing `/` matches alike.
        """
        if not text.startswith("/"):
            raise ValueError(f"{text!r} is not a path pattern starting with /")
        body, wildcard = (text[:-1], True) if text.endswith("*") else (text, False)
        parts: list[str] = []
        params: list[str] = []
        for seg in body.split("/"):
            m = _PARAM.match(seg)
            if m:
                if m.group(1) in params:
                    raise ValueError(f"{text!r} repeats the parameter {{{m.group(1)}}}")
                params.append(m.group(1))
                parts.append(f"(?P<{m.group(1)}>[^/]+)")
            elif "{" in seg or "}" in seg or "*" in seg:
                raise ValueError(f"{text!r} has a malformed segment {seg!r} "
                                 "(use {name} for a whole segment, * only at the end)")
            else:
                parts.append(re.escape(_PCT.sub(_pct, seg)))
        pattern = "/".join(parts)
        if wildcard:
            pattern += ".*"
        elif trailing_slash and pattern not in ("", "/"):
            pattern = pattern.removesuffix("/") + "/?"
        flags = re.IGNORECASE if case_insensitive else 0
        return cls(text, re.compile(pattern + r"\Z", flags), tuple(params))

    def match(self, path: str) -> dict[str, str] | None:
        """The `{param}` values (percent-decoded) if the normalised `path` matches."""
        m = self.regex.match(path)
        if m is None:
            return None
        return {k: unquote(v) for k, v in m.groupdict().items()} if self.params else {}


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: Mapping[str, str]
    path: str = ""  # the normalised raw path that matched: what the upstream receives


def normalize_path(raw: str) -> str:
    """The RFC 3986 §6.2.2 normal form of a raw (percent-encoded) path, slashes merged.

    Path parameters are left in place (`split_params` takes them off).
    """
    if "%" in raw:
        raw = _PCT.sub(_pct, raw)
    if "//" in raw:
        raw = _SLASHES.sub("/", raw)
    if "." in raw:
        raw = remove_dot_segments(raw)
    return raw


def _pct(m: re.Match[str]) -> str:
    byte = int(m.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + m.group(1).upper()


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on whole segments: `.` goes, `..` takes the one before with it."""
    segments = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    if not out or out[0] != "":  # a relative path cannot occur; keep it absolute
        out.insert(0, "")
    return "/".join(out) if len(out) > 1 else "/"


def split_params(path: str) -> tuple[str, bool]:
    """The path without `;` parameters on any segment, and whether there were any."""
    if ";" not in path:
        return path, False
    return "/".join(seg.split(";", 1)[0] for seg in path.split("/")), True


def match(routes: Iterable[Route], method: str, path: str) -> Match | None:
    """The first route whose method and (already normalised) path match; else None."""
    for route in routes:
        if method in route.methods:
            params = route.path.match(path)
            if params is not None:
                return Match(route, params, path)
    return None


def resolve(routes: Iterable[Route], method: str, raw_path: str) -> Match | None:
    """The route for a request's raw path, matched on its normal form (see the module).

    Raises BadRequest when the path carries `;` parameters and its path without them
    matches a route: which resource that names depends on the framework behind.
    """
    path, had_params = split_params(normalize_path(raw_path))
    m = match(routes, method, path)
    if m is not None and had_params:
        raise BadRequest(f"Route {m.route.name!r} does not accept path parameters (';' in "
                         "the path); send the path without them.")
    return m
