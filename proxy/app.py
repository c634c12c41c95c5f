"""The composition root (`create_app`) and the proxied port's handler; the admin
application (never on the same port) is built by proxy/admin.py.

`create_app` is the one place the pieces are assembled: `serve`, the supervisor and the
tests call it with a store and a metrics registry; it opens the upstream session, the
replay cache and its LISTEN connection, and builds both handlers on them.

Both render every `ProblemError` as RFC 9457 problem+json (framing.refused); anything
else that escapes a handler is logged with its traceback and answered as a generic 500
problem (framing.internal_error), never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from yarl import URL

from proxy import logs
from proxy.admin import create_admin_app
from proxy.config import SAFE_METHODS, Config
from proxy.errors import (
    ProblemError,
)
from proxy.flow import idempotency
from proxy.flow.cache import ReplayCache
from proxy.flow.context import Deps, Services, default_observer
from proxy.http import routing
from proxy.http.framing import check_framing, internal_error, refused
from proxy.http.limits import BodyBudget
from proxy.keys.identity import Identities
from proxy.lifecycle import Lifecycle
from proxy.metrics import Metrics
from proxy.observe import Fanout, Observer
from proxy.store import Store
from proxy.store.notify import Notifier
from proxy.upstream import websocket
from proxy.upstream.choice import Upstreams

log = logging.getLogger("idemproxy.app")

ProxyHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class App:
    """What `create_app` assembled. `deps` and `handler` (the proxied port's) are None in
    an admin-only process (the supervisor's)."""

    admin: web.Application
    life: Lifecycle  # requests in flight and the drain (/readyz, /drainz)
    deps: Deps | None = None
    handler: ProxyHandler | None = None

    def proxied(self) -> tuple[Deps, ProxyHandler]:
        if self.deps is None or self.handler is None:
            raise RuntimeError("this App was created with proxied=False")
        return self.deps, self.handler


@contextlib.asynccontextmanager
async def create_app(cfg: Config, *, store: Store, metrics: Metrics,
                     observer: Observer | None = None,
                     proxied: bool = True) -> AsyncIterator[App]:
    """Assemble the proxy for `cfg` on `store` and `metrics`, for the life of the block.
    The flow reports to `observer` (default: `metrics` and the request log).

    `proxied=False`: the admin application only (the supervisor's process, whose workers
    serve the proxied port): no upstream session, cache or LISTEN connection is opened.
    """
    observer = observer or default_observer(metrics)
    if not proxied:
        services = Services(store=store, metrics=metrics, observer=observer)
        yield App(create_admin_app(cfg, services), services.life)
        return
    listens = store.listen_url is not None
    if not listens:
        log.warning("database.pooler is transaction and database.listen_url is not set: "
                    "no LISTEN connection, so concurrent: wait retries poll the store "
                    "and the replay cache is off")
    cache = ReplayCache(cfg.replay_cache) if listens else None
    async with contextlib.AsyncExitStack() as stack:
        flow_store, wrap = store, None
        if cfg.tracing.enabled:  # the SDK is imported only then (proxy/tracing.py)
            from proxy.tracing import Tracing

            tracing = Tracing(cfg)
            # exports what is left: off the loop, whose own server may be the receiver
            stack.push_async_callback(asyncio.to_thread, tracing.shutdown)
            observer = Fanout((observer, tracing))
            flow_store, wrap = tracing.traced_store(store), tracing.wrap
        upstreams = await stack.enter_async_context(Upstreams.open(cfg))
        notifier = (await stack.enter_async_context(
            Notifier(store.acquire_listener, cache=cache)) if listens else None)
        identities = await stack.enter_async_context(Identities.open(cfg))
        deps = Deps(store=flow_store, forwarder=upstreams.default, metrics=metrics,
                    observer=observer, sealer=store.sealer, notifier=notifier, cache=cache,
                    db_clock_offset=await store.clock_offset(), upstreams=upstreams,
                    verify=identities.principal if identities.sets else None)
        stack.push_async_callback(deps.leases.aclose)  # its renewal thread
        stack.callback(deps.cpu.close)  # its thread pool
        handler = create_proxy_handler(cfg, deps)
        yield App(create_admin_app(cfg, deps), deps.life, deps,
                  handler if wrap is None else wrap(handler))


def create_proxy_handler(cfg: Config, deps: Deps) -> ProxyHandler:
    """The proxied port's one handler, for every path and method (see ProxyRunner)."""
    routes = cfg.routes
    budget = BodyBudget(cfg.client.max_body_memory)
    life, metrics = deps.life, deps.metrics

    async def proxy_handler(request: web.BaseRequest) -> web.StreamResponse:
        logs.begin_request()
        started = time.perf_counter()
        metrics.begin_request()
        ticket = budget.ticket(request)
        # A WebSocket tunnel may live for hours: a drain does not wait for it.
        counted = not websocket.wants_tunnel(request)
        life.requests += counted
        try:
            check_framing(request)
            m = None
            if request.method not in SAFE_METHODS:
                m = routing.resolve(routes, request.method, request.rel_url.raw_path)
            if m is None:
                return await idempotency.pass_through_unrouted(request, deps)
            if m.path != request.rel_url.raw_path:  # the upstream gets the path that matched
                request = request.clone(rel_url=URL.build(
                    path=m.path, query_string=request.rel_url.raw_query_string,
                    encoded=True))
            return await idempotency.handle(request, m, deps)
        except ProblemError as exc:
            return refused(request, exc)
        except web.HTTPException:
            raise  # aiohttp answers these itself
        except Exception:
            return internal_error()
        finally:
            ticket.release()
            life.requests -= counted
            metrics.request_ended(time.perf_counter() - started)

    return proxy_handler
