"""The admin application: health, readiness, metrics and key operations, on the admin
listener only (never the proxied port). Every error is problem+json."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy.config import Config
from proxy.config.values import parse_duration
from proxy.errors import (
    AdminUnauthorized,
    BadRequest,
    NotFound,
    ProblemError,
    StoreError,
    for_http_status,
    store_unavailable,
)
from proxy.flow.context import Services
from proxy.http.framing import internal_error, problem_response, refused
from proxy.lifecycle import Phase
from proxy.metrics import exposition

log = logging.getLogger("idemproxy.app")

CONFIG = web.AppKey("config", Config)
DEPS = web.AppKey("deps", Services)
STORE_PROBE_S = 2.0  # a scrape or /readyz?store=1 waits this long for the store at most
MAX_WAIT_S = 600.0  # ?wait= on the drain endpoints

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ProblemError as exc:
        return refused(request, exc)
    except web.HTTPException:
        raise
    except Exception:
        return internal_error()



def create_admin_app(cfg: Config, deps: Services) -> web.Application:
    """Health, readiness, drain, metrics and key operations on the admin listener.

    /healthz, /readyz, /drainz and /metrics are open (probes, preStop hooks and
    Prometheus); everything else needs
    `Authorization: Bearer <token>` when the listener is beyond loopback. Every error is
    problem+json.
    """
    app = web.Application(middlewares=[problem_middleware, _admin_problems,
                                       _admin_auth(cfg)])
    app[CONFIG] = cfg
    app[DEPS] = deps
    deps.metrics.declare_routes(r.name for r in cfg.routes)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/drainz", _drainz)
    app.router.add_post("/admin/drain", _drain)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/keys", _key_show)
    app.router.add_delete("/admin/keys", _key_delete)
    app.router.add_post("/admin/keys/release", _key_release)
    app.router.add_get("/admin/in-flight", _in_flight)
    app.router.add_delete("/admin/tenants/{tenant}", _tenant_erase)
    return app


OPEN_ADMIN_PATHS = frozenset({"/healthz", "/readyz", "/drainz", "/metrics"})


def _admin_auth(cfg: Config) -> Middleware:
    """Beyond loopback, all but the open paths need `Authorization: Bearer $token_env`.

    Deny by default: a path not in OPEN_ADMIN_PATHS needs the token whatever its spelling.
    The token is read once, when the app is built; unset, every guarded call is refused.
    """
    token = os.environ.get(cfg.admin.token_env, "")
    if not cfg.admin.listen.is_loopback and not token:
        log.warning("admin listens beyond loopback and $%s is not set: key operations "
                    "are refused", cfg.admin.token_env)
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not cfg.admin.listen.is_loopback and request.path not in OPEN_ADMIN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), expected)
            if not (ok and expected):
                raise AdminUnauthorized(
                    f"Send Authorization: Bearer with the token from ${cfg.admin.token_env}.",
                    headers={"WWW-Authenticate": 'Bearer realm="idemproxy-admin"'})
        return await handler(request)

    return auth


@web.middleware
async def _admin_problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 answers, as problem+json like every other admin error."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem_response(for_http_status(
            exc.status, reason=exc.reason,
            detail=f"The admin API has no {request.method} {request.path}.", headers=allow))


async def _healthz(request: web.Request) -> web.Response:
    """Liveness: the process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    """Readiness: serving and not draining, whatever the shared store's state (a store
    outage must not take every replica out of its Service at once: guarded requests
    answer 503 themselves). `?store=1` also needs the store reachable and migrated."""
    deps = request.app[DEPS]
    if deps.life.draining:
        return web.json_response({"status": deps.life.phase.value}, status=503)
    if request.query.get("store") in ("1", "true") and not await _store_ready(deps):
        return web.json_response({"status": "store unavailable or not migrated"}, status=503)
    return web.json_response({"status": "ready"})


async def _store_ready(deps: Services) -> bool:
    try:
        up = await asyncio.wait_for(deps.store.ready(), STORE_PROBE_S)
    except TimeoutError:
        up = False
    deps.metrics.store_up.set(1 if up else 0)
    return up


def _wait_of(request: web.Request) -> float | None:
    """?wait=DURATION (e.g. 30s): how long to hold the answer until the drain is done."""
    text = request.query.get("wait")
    if text is None:
        return None
    try:
        wait = parse_duration(text)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_S:
        raise BadRequest(f"wait must be a duration like 30s, at most {MAX_WAIT_S:g}s.")
    return wait


async def _drain_answer(request: web.Request, wait: float | None, *,
                        pending: int) -> web.Response:
    """200 once the drain is done, else `pending` (its counts in the body)."""
    life = request.app[DEPS].life
    if wait:
        await life.wait(wait)
    done = life.phase is Phase.DRAINED
    return web.json_response(life.status(), status=200 if done else pending)


async def _drainz(request: web.Request) -> web.Response:
    """GET /drainz[?wait=30s]: 200 once a drain is done, else 503; never starts one (an
    app container's preStop hook waits here for the proxy's drain)."""
    return await _drain_answer(request, _wait_of(request), pending=503)


async def _drain(request: web.Request) -> web.Response:
    """POST /admin/drain[?wait=30s]: start draining (lifecycle.py); 200 once done, 202
    with the counts still in flight otherwise."""
    wait = _wait_of(request)
    life = request.app[DEPS].life
    if not life.draining:
        log.warning("drain requested: refusing new claims, finishing in-flight requests")
    life.start_drain()
    return await _drain_answer(request, wait, pending=202)


async def _metrics(request: web.Request) -> web.Response:
    # The waiters gauge is kept by the flow itself (inc/dec around each wait); setting it
    # here from the notifier's count would make the two drift apart.
    deps = request.app[DEPS]
    deps.metrics.observe_pool(deps.store.pool)
    deps.metrics.observe_cache(deps.cache)
    await _store_ready(deps)
    body, content_type = exposition(deps.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": content_type})


def _scope_key(request: web.Request) -> tuple[str, str]:
    scope, key = request.query.get("scope"), request.query.get("key")
    if not scope or not key:
        raise BadRequest("Pass ?scope=ROUTE:TENANT&key=KEY (the scope as "
                         "/admin/in-flight or `idemproxy keys list` shows it).")
    return scope, key


async def _key_show(request: web.Request) -> web.Response:
    """GET /admin/keys?scope=&key=: the key's record (state, status, times, size)."""
    scope, key = _scope_key(request)
    rec = await _admin_call(request.app[DEPS].store.show(scope=scope, key=key))
    if rec is None:
        raise NotFound("No record for this key in this scope.")
    return web.json_response(rec)


async def _tenant_erase(request: web.Request) -> web.Response:
    """DELETE /admin/tenants/{hash}: erase every completed record of one tenant (the hash
    in its scopes, as `idemproxy tenant-hash` prints); every replay cache drops them.
    Claims still in flight are left alone and counted (`in_flight`): call again later."""
    from proxy.store.atrest import erase_tenant

    tenant = request.match_info["tenant"]
    if not re.fullmatch(r"[0-9a-f]{32}", tenant):
        raise BadRequest("The tenant is the 32-hex-digit hash in its scopes "
                         "(`idemproxy tenant-hash CREDENTIAL` prints it).")
    deps = request.app[DEPS]
    done = await _admin_call(erase_tenant(deps.store, tenant))
    if deps.cache is not None:  # at once here; other processes hear the NOTIFY
        deps.cache.clear()
    log.warning("admin erased a tenant", extra={"fields": {
        "tenant": tenant, "deleted": done.deleted, "in_flight": done.in_flight}})
    return web.json_response({"deleted": done.deleted, "in_flight": done.in_flight})


async def _key_delete(request: web.Request) -> web.Response:
    """DELETE /admin/keys?scope=&key=: forget the key; its next request executes again."""
    scope, key = _scope_key(request)
    deps = request.app[DEPS]
    deleted = await _admin_call(deps.store.delete(scope=scope, key=key))
    if deps.cache is not None:  # at once here; other processes hear the NOTIFY
        deps.cache.forget(scope, key)
    if not deleted:
        raise NotFound("No record for this key in this scope.")
    log.warning("admin deleted a key", extra={"fields": {"scope": scope.split(":")[0]}})
    return web.json_response({"deleted": True})


async def _key_release(request: web.Request) -> web.Response:
    """POST /admin/keys/release?scope=&key=: end a stuck in-flight claim now."""
    scope, key = _scope_key(request)
    if not await _admin_call(request.app[DEPS].store.force_release(scope=scope, key=key)):
        raise NotFound("No in-flight claim for this key in this scope (completed "
                            "keys are deleted, not released).")
    log.warning("admin released a claim", extra={"fields": {"scope": scope.split(":")[0]}})
    return web.json_response({"released": True})


async def _in_flight(request: web.Request) -> web.Response:
    """GET /admin/in-flight[?limit=N]: the oldest in-flight claims, up to N (100)."""
    limit = request.query.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 10000:
        raise BadRequest("limit must be a whole number from 1 to 10000.")
    rows = await _admin_call(request.app[DEPS].store.in_flight(limit=int(limit)))
    return web.json_response({"in_flight": rows})


async def _admin_call(coro: Awaitable[T]) -> T:
    try:
        return await coro
    except StoreError as exc:
        raise store_unavailable() from exc
