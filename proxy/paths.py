"""Pure path handling: compiled route patterns and the RFC 3986 normal form of a path.

A leaf module (config compiles `match.path` with it; routing matches with it). See
routing.py for why guarded paths are matched normalised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

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
