"""The one flow for a guarded request.

    key → claim ─┬─ NEW / TAKEN_OVER → forward ─┬─ release status → pass on, release
                 │                              ├─ answer → stream + record → complete
                 │                              └─ failed → release (not sent) | keep / store
                 └─ EXISTING ─┬─ other fingerprint → 422
                              ├─ completed → replay
                              └─ in flight → 409, or wait (concurrent: wait) then re-claim
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import NoReturn

from aiohttp import web

from proxy import keys
from proxy.config import Route
from proxy.errors import (
    ProblemError,
    StoredAnswerUnreadable,
    StoreError,
    UpgradeRefused,
    UpstreamError,
    store_unavailable,
)
from proxy.flow import decide
from proxy.flow.context import Deps, Guarded, finish, log
from proxy.flow.decide import OnClaim, OnStoreDown
from proxy.flow.execute import execute, fail_dead_claim
from proxy.flow.relay import pass_through, read_body
from proxy.flow.replay import replay
from proxy.http.routing import Match
from proxy.observe import UNROUTED_PASS_THROUGH, Outcome
from proxy.store import Claim, ClaimOutcome, Record, State, notify_channel_id
from proxy.upstream import websocket

__all__ = ["Deps", "Guarded", "handle", "pass_through_unrouted"]

UNGUARDED_HEADER = "Idempotency-Status"


async def handle(request: web.BaseRequest, m: Match, deps: Deps) -> web.StreamResponse:
    route = m.route
    try:
        if websocket.asks_upgrade(request):  # a tunnel cannot be recorded or replayed
            raise UpgradeRefused(
                f"{request.method} {route.path.text} is guarded by route {route.name!r}: a "
                "protocol upgrade (Upgrade: ...) cannot be made idempotent. Send it without "
                "Upgrade, or on a path and method no route guards.")
        g, body = await _identify(request, m, deps)
    except ProblemError as exc:
        finish(deps, None, route, Outcome.REJECTED, exc.status)
        raise
    if g is None:
        finish(deps, None, route, Outcome.PASS_THROUGH, 0)
        return await _unguarded(request, deps, body, route=route)
    cache = deps.cache
    seen = 0
    if cache is not None and cache.live:
        rec = cache.get(g.scope, g.key, db_now=time.time() + deps.db_clock_offset)
        if rec is not None:  # a completed record: what the claim would return
            deps.observer.cache_hit()
            _match_fingerprint(deps, g, rec)
            return await _answer(request, deps, g, Claim(ClaimOutcome.EXISTING, rec))
        seen = cache.version
    if deps.life.draining:  # nothing claimed: the retry is safe on another replica
        _refuse(deps, g, decide.DRAINING)
    try:
        claim = await _claim(deps, g)
    except StoreError as exc:
        return await _store_down(request, deps, g, exc)
    if (cache is not None and claim.outcome is ClaimOutcome.EXISTING
            and claim.record.state is State.COMPLETED):
        cache.put(g.scope, g.key, claim.record, seen=seen)
    return await _answer(request, deps, g, claim)


async def _identify(request: web.BaseRequest, m: Match, deps: Deps
                    ) -> tuple[Guarded | None, bytes | None]:
    """The key, scope and fingerprint; (None, body) when the request is unguarded.

    The body is read first only for body keys; bucketed keys use the database's clock.
    """
    route, body = m.route, None
    if route.key.body:
        body = await read_body(request, limit=route.max_request_body)
    sealer = deps.sealer
    key = await deps.cpu.run(
        keys.read_key, route, size=len(body or b""), canonical=bool(route.key.body),
        headers=request.headers, params=m.params, body=body,
        now=time.time() + deps.db_clock_offset, keyed=sealer.body_key)
    if key is None:
        return None, body
    # Pure, before anything runs: a retry older than the window is refused (keys/age.py).
    keys.check_age(route, key=key, headers=request.headers,
                   now=time.time() + deps.db_clock_offset)
    # Before the body is read: a refusal goes out before any 100 Continue (RFC 9110 §10.1.1).
    scope = keys.scope_of(route, keys.tenant_of(route, request.headers,
                                                keyed=sealer.tenant_hash, verify=deps.verify))
    if body is None:
        body = await read_body(request, limit=route.max_request_body)
    digest = await deps.cpu.run(
        keys.fingerprint, route, size=len(body), canonical=route.fingerprint.canonical_json,
        method=request.method, path=request.rel_url.raw_path,
        query=request.rel_url.raw_query_string, body=body, headers=request.headers,
        content_type=request.headers.get("Content-Type", ""))
    return Guarded(route, scope, key, sealer.fingerprint(digest), body,
                   key_hash=sealer.key_hash(scope, key), digest=digest), body


async def _claim(deps: Deps, g: Guarded) -> Claim:
    """Claim the key, or read the record that holds it.

    A record that cannot be opened is an error answered as such (StoredAnswerUnreadable,
    500), never a miss. A record fingerprinted under an older key is compared under that
    key (_match_fingerprint); when it is this request's claim, still in flight, the claim
    runs again with that fingerprint so a dead claim can be taken over."""
    try:
        claim = await _claim_once(deps, g)
    except StoredAnswerUnreadable as exc:
        finish(deps, g, g.route, Outcome.STORE_ERROR, exc.status)
        raise
    if claim.outcome is ClaimOutcome.EXISTING and claim.record.state is State.IN_FLIGHT:
        deps.sightings.saw(g.scope, g.key, claim.record.beat)
    else:
        deps.sightings.forget(g.scope, g.key)
    if claim.outcome is ClaimOutcome.EXISTING:
        before = g.fingerprint
        _match_fingerprint(deps, g, claim.record)
        if g.fingerprint != before and claim.record.state is State.IN_FLIGHT:
            return await _claim(deps, g)
    return claim


def _claim_once(deps: Deps, g: Guarded) -> Awaitable[Claim]:
    """One claim; a dead claim is taken over only with evidence from this process's own
    clock that its owner stopped renewing (store/sightings.py), never on the database's
    clock alone."""
    lease = g.route.lock_timeout
    return deps.store.claim(scope=g.scope, key=g.key, fingerprint=g.fingerprint,
                            token=g.token, lease=lease, ttl=g.route.ttl,
                            seen=deps.sightings.evidence(g.scope, g.key, lease=lease))


def _match_fingerprint(deps: Deps, g: Guarded, rec: Record) -> None:
    """A record fingerprinted before a key rotation is compared under its own key: when
    it holds this request, g takes its fingerprint. One whose key is gone cannot be
    compared: an error, never a re-execution or a false mismatch."""
    if rec.fingerprint == g.fingerprint:
        return
    sealer = deps.sealer
    alt = sealer.fingerprint_as(rec.fingerprint, g.digest)
    if alt is None:
        finish(deps, g, g.route, Outcome.STORE_ERROR, 500)
        raise sealer.fingerprint_unreadable(rec.fingerprint, scope=g.scope)
    if alt == rec.fingerprint:
        g.fingerprint = alt


async def pass_through_unrouted(request: web.BaseRequest, deps: Deps) -> web.StreamResponse:
    """No route (or a safe method): stream through untouched; an upgrade (WebSocket)
    becomes a tunnel to the upstream."""
    deps.observer.request_done(UNROUTED_PASS_THROUGH)
    fwd = deps.forwarder_for_path(request.rel_url.raw_path)
    if websocket.wants_tunnel(request):
        return await websocket.tunnel(request, fwd)
    try:  # _unguarded's work, without its coroutine: every unrouted request comes here
        return await pass_through(request, fwd)
    except UpstreamError as exc:
        raise exc.problem from exc


async def _unguarded(request: web.BaseRequest, deps: Deps, body: bytes | None,
                     extra: dict[str, str] | None = None, *,
                     route: Route | None) -> web.StreamResponse:
    fwd = deps.forwarder_for(route) if route is not None else \
        deps.forwarder_for_path(request.rel_url.raw_path)
    try:
        return await pass_through(request, fwd, body=body, extra=extra)
    except UpstreamError as exc:
        raise exc.problem from exc


async def _store_down(request: web.BaseRequest, deps: Deps, g: Guarded,
                      exc: StoreError) -> web.StreamResponse:
    log.error("store call failed before forwarding: %s", exc)
    if decide.on_store_down(g.route.store_unavailable) is OnStoreDown.PASS_THROUGH:
        finish(deps, g, g.route, Outcome.STORE_ERROR, 0)
        return await _unguarded(request, deps, g.body, {UNGUARDED_HEADER: "unguarded"},
                                route=g.route)
    finish(deps, g, g.route, Outcome.STORE_ERROR, 503)
    raise store_unavailable() from exc


def _on_claim(g: Guarded, claim: Claim, *, may_wait: bool = True) -> OnClaim:
    route, rec = g.route, claim.record
    return decide.on_claim(claim.outcome, state=rec.state,
                           same_fingerprint=rec.fingerprint == g.fingerprint,
                           concurrent=route.concurrent,
                           unknown_outcome=route.unknown_outcome, may_wait=may_wait)


async def _answer(request: web.BaseRequest, deps: Deps, g: Guarded,
                  claim: Claim) -> web.StreamResponse:
    """Carry out what decide.on_claim says this claim's result means."""
    route, rec = g.route, claim.record
    verdict = _on_claim(g, claim)
    if claim.outcome is ClaimOutcome.TAKEN_OVER:
        deps.observer.takeover(route.name)
        log.warning("claim taken over after its lease ended",
                    extra={"fields": {"route": route.name, "key_hash": g.key_hash}})
    if verdict is OnClaim.FORWARD:
        return await execute(request, deps, g, claim)
    if verdict is OnClaim.FAIL_DEAD_CLAIM:
        return await fail_dead_claim(deps, g, claim)
    if verdict is OnClaim.REPLAY:
        resp = await replay(request, rec, route=route, scope=g.scope, key=g.key,
                            store=deps.store)
        finish(deps, g, route, Outcome.REPLAYED, rec.status or 0)
        return resp
    if verdict is OnClaim.WAIT:
        return await _wait(request, deps, g, rec)
    _refuse(deps, g, decide.refusal(verdict, route=route, expires_at=rec.expires_at))


def _refuse(deps: Deps, g: Guarded, answer: decide.Refusal) -> NoReturn:
    """End a guarded request the decision alone answers: counted, logged, then raised
    for the proxied port's refusal handler to answer."""
    finish(deps, g, g.route, answer.outcome, answer.status)
    raise answer.error()


async def _wait(request: web.BaseRequest, deps: Deps, g: Guarded,
                rec: Record) -> web.StreamResponse:
    """Hold a retry until the first completes; re-claim on each wake-up or poll."""
    deadline = time.monotonic() + g.route.wait_timeout
    poll = 0.05
    deps.observer.waiting(1)
    try:
        while (left := deadline - time.monotonic()) > 0:
            await _sleep_until_notified(deps, g, min(poll, left))
            poll = min(poll * 2, 1.0)
            try:
                claim = await _claim(deps, g)
            except StoreError as exc:
                return await _store_down(request, deps, g, exc)
            rec = claim.record
            if _on_claim(g, claim) is not OnClaim.WAIT:
                break
        else:  # decide.on_claim(..., may_wait=False): still in flight, so 409
            _refuse(deps, g, decide.refusal(OnClaim.CONFLICT, route=g.route,
                                            expires_at=rec.expires_at, waited=True))
    finally:
        deps.observer.waiting(-1)
    return await _answer(request, deps, g, claim)


async def _sleep_until_notified(deps: Deps, g: Guarded, timeout: float) -> None:
    if deps.notifier is None:
        await asyncio.sleep(timeout)
        return
    with deps.notifier.waiter(notify_channel_id(g.scope, g.key)) as fut:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fut, timeout)
