"""The two aiohttp applications: the proxied port and the admin port (never the same).

One middleware renders every `ProblemError` as RFC 9457 problem+json; anything else that
escapes a handler is logged with its traceback and answered as a generic 500 problem,
never a traceback to the client.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import idempotency, routing
from proxy.config import SAFE_METHODS, Config
from proxy.errors import KeyMissing, ProblemError, StoreUnavailable
from proxy.idempotency import Deps

log = logging.getLogger("idemproxy.app")

CONFIG = web.AppKey("config", Config)
DEPS = web.AppKey("deps", Deps)
STATE = web.AppKey("state", dict)

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM_JSON = "application/problem+json"


def problem_response(exc: ProblemError, *, instance: str | None = None) -> web.Response:
    resp = web.Response(status=exc.status, body=exc.body(instance=instance),
                        content_type=PROBLEM_JSON)
    resp.headers.update(exc.headers)
    return resp


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        log.info("request refused", extra={"fields": {
            "method": request.method, "status": exc.status, "type": exc.slug}})
        return problem_response(exc)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unhandled error in request handler")
        internal = ProblemError("The proxy hit an internal error; nothing was stored.")
        return problem_response(internal)


def create_proxy_app(cfg: Config, deps: Deps) -> web.Application:
    """The proxied port: every path and method goes through `proxy_handler`."""
    app = web.Application(middlewares=[problem_middleware], handler_args={
        "max_field_size": 16384, "max_line_size": 16384})
    app[CONFIG] = cfg
    app[DEPS] = deps

    async def proxy_handler(request: web.Request) -> web.StreamResponse:
        m = None
        if request.method not in SAFE_METHODS:
            m = routing.match(cfg.routes, request.method, request.path)
        if m is None:
            return await idempotency.pass_through_unrouted(request, deps)
        return await idempotency.handle(request, m, deps)

    app.router.add_route("*", "/{tail:.*}", proxy_handler)
    return app


def create_admin_app(cfg: Config, deps: Deps, *, state: dict[str, bool] | None = None
                     ) -> web.Application:
    """Health, readiness, metrics and key operations; mutating calls may need a token."""
    app = web.Application(middlewares=[problem_middleware, _admin_auth(cfg)])
    app[CONFIG] = cfg
    app[DEPS] = deps
    app[STATE] = state if state is not None else {"shutting_down": False}
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/keys", _key_show)
    app.router.add_delete("/admin/keys", _key_delete)
    app.router.add_post("/admin/keys/release", _key_release)
    app.router.add_get("/admin/in-flight", _in_flight)
    return app


def _admin_auth(cfg: Config) -> Middleware:
    """Beyond loopback, /admin/ calls need `Authorization: Bearer $token_env`."""

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/") and not cfg.admin.listen.is_loopback:
            token = os.environ.get(cfg.admin.token_env, "")
            given = request.headers.get("Authorization", "")
            if not token or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return web.json_response({"type": "https://idemproxy.dev/errors/unauthorized",
                                          "title": "Unauthorized", "status": 401,
                                          "detail": f"Send Authorization: Bearer with the "
                                                    f"token from ${cfg.admin.token_env}."},
                                         status=401, content_type=PROBLEM_JSON,
                                         headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return auth


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    if request.app[STATE].get("shutting_down"):
        return web.json_response({"status": "shutting down"}, status=503)
    if not await request.app[DEPS].store.ready():
        return web.json_response({"status": "store unavailable or not migrated"}, status=503)
    return web.json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    if deps.notifier is not None:
        deps.metrics.waiters.set(deps.notifier.waiting)
    body = generate_latest(deps.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _scope_key(request: web.Request) -> tuple[str, str]:
    scope, key = request.query.get("scope"), request.query.get("key")
    if not scope or not key:
        raise KeyMissing("Pass ?scope=ROUTE:TENANT&key=KEY (scope as shown by "
                         "/admin/in-flight).")
    return scope, key


async def _key_show(request: web.Request) -> web.Response:
    scope, key = _scope_key(request)
    rec = await _admin_call(request.app[DEPS].store.show(scope=scope, key=key))
    if rec is None:
        return web.json_response({"detail": "no such key"}, status=404)
    return web.json_response(rec)


async def _key_delete(request: web.Request) -> web.Response:
    scope, key = _scope_key(request)
    gone = await _admin_call(request.app[DEPS].store.delete(scope=scope, key=key))
    return web.json_response({"deleted": gone}, status=200 if gone else 404)


async def _key_release(request: web.Request) -> web.Response:
    scope, key = _scope_key(request)
    done = await _admin_call(request.app[DEPS].store.force_release(scope=scope, key=key))
    return web.json_response({"released": done}, status=200 if done else 404)


async def _in_flight(request: web.Request) -> web.Response:
    rows = await _admin_call(request.app[DEPS].store.in_flight(limit=100))
    return web.json_response({"in_flight": rows})


async def _admin_call(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except StoreUnavailable as exc:
        raise web.HTTPServiceUnavailable(text=str(exc)) from exc
