"""Cross-field checks: configs whose fields are each valid but cannot work as written.

Errors (the config is refused): a route that can never match because an earlier route
takes all its requests, a path with `?` or whitespace, the admin listener on the proxied
port, `database.pool_min` above `pool_max`. Warnings (it loads; check-config prints them
and serve logs them): a route that loses some of its methods to an earlier one, a wait
longer than the key's window (a lease longer than it is refused), no `upstream` at all.
"""

from __future__ import annotations

from typing import Any

from proxy.config.schema import Concurrent, Config, Listen, Route
from proxy.config.values import Reader, format_duration

# Stands for "any segment" when testing whether one pattern covers another: no literal
# in a pattern contains it, so only a {param} or a trailing * can match it.
_ANY = "\u2603"
_SUFFIXES = ("", _ANY, "/" + _ANY, f"{_ANY}/{_ANY}")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def check_config(r: Reader, cfg: Config) -> None:
    """Report the errors that only show in a combination of fields."""
    for i, route in enumerate(cfg.routes):
        text = route.path.text
        if "?" in text or "#" in text:
            r.report(f"routes[{i}].match.path: {text!r} contains {'?' if '?' in text else '#'}"
                     ": paths are matched without the query, so it can never match")
        if any(c.isspace() for c in text):
            r.report(f"routes[{i}].match.path: {text!r} contains whitespace, which no "
                     "request path has (spell it %20)")
        for j, earlier in enumerate(cfg.routes[:i]):
            if route.methods <= earlier.methods and covers(earlier, route):
                same = earlier.path.text == text and earlier.methods == route.methods
                why = "has the same path and methods as" if same else \
                    "can never match: every request it would take goes first to"
                r.report(f"routes[{i}] ({route.name!r}) {why} routes[{j}] "
                         f"({earlier.name!r}, {earlier.path.text!r}); routes are tried "
                         "in order, so put the narrower one first")
                break
    if _same_socket(cfg.listen, cfg.admin.listen):
        r.report(f"admin.listen: {cfg.admin.listen} is the proxied port (listen: "
                 f"{cfg.listen}); the admin interface needs its own port")
    if cfg.database.pool_min > cfg.database.pool_max:
        r.report(f"database.pool_min: {cfg.database.pool_min} is more than "
                 f"database.pool_max ({cfg.database.pool_max})")


def config_warnings(cfg: Config, top: dict[str, Any]) -> tuple[str, ...]:
    """What loads but probably does not do what was meant."""
    out: list[str] = []
    if not isinstance(top.get("upstream"), dict) or "url" not in top["upstream"]:
        out.append(f"upstream.url: not set; requests go to the default {cfg.upstream.url}")
    for i, route in enumerate(cfg.routes):
        out.extend(_route_warnings(cfg, i, route))
    return tuple(out)


def _route_warnings(cfg: Config, i: int, route: Route) -> list[str]:
    out: list[str] = []
    at = f"routes[{i}] ({route.name!r})"
    for j, earlier in enumerate(cfg.routes[:i]):
        lost = route.methods & earlier.methods
        if lost and not route.methods <= earlier.methods and covers(earlier, route):
            out.append(f"{at}: its {', '.join(sorted(lost))} requests go first to "
                       f"routes[{j}] ({earlier.name!r}, {earlier.path.text!r})")
    ttl = format_duration(route.ttl)
    # lock_timeout > ttl is an error (config/routes.py, issue #17), not a warning
    if route.concurrent is Concurrent.WAIT and route.wait_timeout > route.ttl:
        out.append(f"{at}.wait_timeout: {format_duration(route.wait_timeout)} is longer "
                   f"than ttl ({ttl}): a held retry can outwait the key's window")
    return out


def covers(earlier: Route, later: Route) -> bool:
    """Whether `earlier`'s path pattern matches every path `later`'s matches.

    `later`'s {param} segments and its trailing * are filled with a character no literal
    contains: only a {param} or * of `earlier` can match those, and they then match any
    value. So testing a handful of sample paths decides it for this pattern language.
    """
    text = later.path.text
    body, wildcard = (text[:-1], True) if text.endswith("*") else (text, False)
    base = "/".join(_ANY if seg.startswith("{") else seg for seg in body.split("/"))
    samples = [base + s for s in _SUFFIXES] if wildcard else [base]
    return all(earlier.path.match(s) is not None for s in samples)


def _same_socket(a: Listen, b: Listen) -> bool:
    if a.port != b.port or a.port == 0:
        return False
    return a.host == b.host or a.host in _WILDCARD_HOSTS or b.host in _WILDCARD_HOSTS
