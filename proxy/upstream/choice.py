"""Which upstream a request goes to: the default `upstream`, or a route's own.

A route's `upstream` takes every request whose path its `match.path` matches, whatever
the method: the guarded ones, and also the GETs and other unguarded requests on that
path (an API's reads go where its writes go). Routes are tried in order, as for guarding;
a path no route matches goes to the default upstream. A client can never choose.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from proxy.config import Config, Route
from proxy.paths import PathPattern, normalize_path, split_params
from proxy.upstream.forward import Forwarder


class Upstreams:
    """The default forwarder and one per upstream the routes name."""

    def __init__(self, default: Forwarder, named: dict[str, Forwarder],
                 routes: tuple[Route, ...]) -> None:
        self.default = default
        self._named = named
        # Only when some route has its own upstream does a path need looking at.
        self._paths: tuple[tuple[PathPattern, Forwarder], ...] = ()
        if any(r.upstream for r in routes):
            self._paths = tuple((r.path, named[r.upstream] if r.upstream else default)
                                for r in routes)

    def for_route(self, route: Route) -> Forwarder:
        return self._named[route.upstream] if route.upstream else self.default

    def for_path(self, raw_path: str) -> Forwarder:
        """For a request no route guards: the first route whose pattern matches the
        normalised path decides (the same normal form guarded requests match on, so
        `/mail/../v1/x` goes where `/v1/x` would)."""
        if not self._paths:
            return self.default
        path = split_params(normalize_path(raw_path))[0]
        for pattern, fwd in self._paths:
            if pattern.regex.match(path):
                return fwd
        return self.default

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Config) -> AsyncIterator[Upstreams]:
        async with contextlib.AsyncExitStack() as stack:
            trusted = cfg.trusted_proxies
            default = await stack.enter_async_context(Forwarder.open(cfg.upstream,
                                                                     trusted=trusted))
            named = {}
            for name, up in cfg.upstreams.items():
                where = f"upstreams.{name}" if "://" not in name else "routes[].upstream"
                named[name] = await stack.enter_async_context(
                    Forwarder.open(up, where=where, trusted=trusted))
            yield cls(default, named, cfg.routes)
