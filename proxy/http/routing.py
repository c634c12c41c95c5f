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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.config import Route
from proxy.errors import BadRequest
from proxy.paths import PathPattern, normalize_path, remove_dot_segments, split_params

__all__ = ["Match", "PathPattern", "match", "normalize_path", "remove_dot_segments",
           "resolve", "split_params"]


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: Mapping[str, str]
    path: str = ""  # the normalised raw path that matched: what the upstream receives


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
