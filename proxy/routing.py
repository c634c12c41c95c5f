"""Pure route matching: path patterns (literal, `{param}` segments, trailing `*`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config import Route

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A compiled path pattern. `/orders/{id}` binds one segment; `/files/*` any suffix."""

    text: str
    regex: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def compile(cls, text: str) -> PathPattern:
        """Compile `text`; raise ValueError with a reason when it is not a valid pattern."""
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
                parts.append(re.escape(seg))
        pattern = "/".join(parts) + (".*" if wildcard else "")
        return cls(text, re.compile(pattern + r"\Z"), tuple(params))

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.match(path)
        return m.groupdict() if m else None


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: Mapping[str, str]


def match(routes: Iterable[Route], method: str, path: str) -> Match | None:
    """The first route whose method and path match, with its path parameters; else None."""
    for route in routes:
        if method in route.methods:
            params = route.path.match(path)
            if params is not None:
                return Match(route, params)
    return None
