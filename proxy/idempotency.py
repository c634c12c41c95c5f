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
import hashlib
import logging
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy import headers as hdrs
from proxy import keys
from proxy.config import Concurrent, Route, StoreUnavailablePolicy, UnknownOutcome
from proxy.errors import (
    KeyInFlight, KeyReused, ProblemError, ServiceUnavailable, StoreUnavailable,
    UpstreamFailed,
)
from proxy.forward import Forwarder, UpstreamError, UpstreamResponse
from proxy.metrics import Metrics, Outcome
from proxy.recorder import INLINE, Recorder
from proxy.relay import (
    ClientSink, open_upstream, pass_through, read_body, response_for, whole_response,
)
from proxy.replay import guard_headers, replay
from proxy.routing import Match
from proxy.store import Claim, ClaimOutcome, Completion, State
from proxy.store.notify import Notifier
from proxy.store.postgres import PostgresStore, notify_channel_id

log = logging.getLogger("idemproxy.request")

UNGUARDED_HEADER = "Idempotency-Status"


@dataclass
class Deps:
    """What the flow needs, passed in once at start-up."""

    store: PostgresStore
    forwarder: Forwarder
    metrics: Metrics
    notifier: Notifier | None = None
    db_clock_offset: float = 0.0  # database clock minus local clock, for key buckets
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run an owned background task (kept referenced; cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


@dataclass
class Guarded:
    """One guarded request's identity."""

    route: Route
    scope: str
    key: str
    fingerprint: bytes
    body: bytes
    token: uuid.UUID = field(default_factory=uuid.uuid4)
    started: float = field(default_factory=time.perf_counter)

    @property
    def notify(self) -> bool:
        """Only routes that hold retries (concurrent: wait) have waiters to wake."""
        return self.route.concurrent is Concurrent.WAIT

    @property
    def key_hash(self) -> str:
        return hashlib.sha256(f"{self.scope}\x1f{self.key}".encode(
            "utf-8", "surrogateescape")).hexdigest()[:16]


def _finish(deps: Deps, g: Guarded | None, route: Route, outcome: Outcome, status: int) -> None:
    deps.metrics.count(route.name, outcome)
    if g is not None:
        log.info("guarded request", extra={"fields": {
            "route": route.name, "outcome": outcome.value, "status": status,
            "key_hash": g.key_hash, "tenant": g.scope.split(":", 1)[1],
            "duration_ms": round((time.perf_counter() - g.started) * 1000, 2)}})


async def handle(request: web.Request, m: Match, deps: Deps) -> web.StreamResponse:
    route = m.route
    try:
        g, body = await _identify(request, m, deps)
    except ProblemError as exc:
        _finish(deps, None, route, Outcome.REJECTED, exc.status)
        raise
    if g is None:
        _finish(deps, None, route, Outcome.PASS_THROUGH, 0)
        return await _unguarded(request, deps, body)
    try:
        claim = await deps.store.claim(scope=g.scope, key=g.key, fingerprint=g.fingerprint,
                                       token=g.token, lease=route.lock_timeout, ttl=route.ttl)
    except StoreUnavailable as exc:
        return await _store_down(request, deps, g, exc)
    return await _answer(request, deps, g, claim)


async def _identify(request: web.Request, m: Match, deps: Deps
                    ) -> tuple[Guarded | None, bytes | None]:
    """The key, scope and fingerprint; (None, body) when the request is unguarded.

    The body is read first only for body keys; bucketed keys use the database's clock.
    """
    route, body = m.route, None
    if route.key.body:
        body = await read_body(request, limit=route.max_request_body)
    key = keys.read_key(route, headers=request.headers, params=m.params, body=body,
                        now=time.time() + deps.db_clock_offset)
    if key is None:
        return None, body
    if body is None:
        body = await read_body(request, limit=route.max_request_body)
    scope = keys.scope_of(route, keys.tenant_of(route, request.headers))
    fp = keys.fingerprint(route, method=request.method, path=request.rel_url.raw_path,
                          query=request.rel_url.raw_query_string, body=body,
                          headers=request.headers,
                          content_type=request.headers.get("Content-Type", ""))
    return Guarded(route, scope, key, fp, body), body


async def pass_through_unrouted(request: web.Request, deps: Deps) -> web.StreamResponse:
    """No route (or a safe method): stream through untouched."""
    deps.metrics.count("-", Outcome.PASS_THROUGH)
    return await _unguarded(request, deps, None)


async def _unguarded(request: web.Request, deps: Deps, body: bytes | None,
                     extra: dict[str, str] | None = None) -> web.StreamResponse:
    try:
        return await pass_through(request, deps.forwarder, body=body, extra=extra)
    except UpstreamError as exc:
        raise exc.problem from exc


async def _store_down(request: web.Request, deps: Deps, g: Guarded,
                      exc: StoreUnavailable) -> web.StreamResponse:
    log.error("store unavailable: %s", exc)
    if g.route.store_unavailable is StoreUnavailablePolicy.PASS_THROUGH:
        _finish(deps, g, g.route, Outcome.STORE_ERROR, 0)
        return await _unguarded(request, deps, g.body, {UNGUARDED_HEADER: "unguarded"})
    _finish(deps, g, g.route, Outcome.STORE_ERROR, 503)
    raise ServiceUnavailable("The idempotency store is unreachable; the request was not "
                             "forwarded. Retry later.", headers={"Retry-After": "1"}) from exc


async def _answer(request: web.Request, deps: Deps, g: Guarded,
                  claim: Claim) -> web.StreamResponse:
    route, rec = g.route, claim.record
    if claim.outcome is not ClaimOutcome.EXISTING:
        if claim.outcome is ClaimOutcome.TAKEN_OVER:
            deps.metrics.takeovers.labels(route.name).inc()
            log.warning("claim taken over after its lease ended",
                        extra={"fields": {"route": route.name, "key_hash": g.key_hash}})
            if route.unknown_outcome is UnknownOutcome.FAIL:
                return await _fail_dead_claim(deps, g)
        return await _execute(request, deps, g, claim)
    if rec.fingerprint != g.fingerprint:
        _finish(deps, g, route, Outcome.MISMATCH, 422)
        raise KeyReused("This idempotency key was already used for a different request "
                        "(method, path, query or body differ). Use a new key.",
                        headers=guard_headers(route, rec.expires_at))
    if rec.state is State.COMPLETED:
        resp = await replay(request, rec, route=route, scope=g.scope, key=g.key,
                            store=deps.store)
        _finish(deps, g, route, Outcome.REPLAYED, rec.status or 0)
        return resp
    if route.concurrent is Concurrent.WAIT:
        return await _wait(request, deps, g)
    _finish(deps, g, route, Outcome.CONFLICT, 409)
    raise KeyInFlight("A request with this idempotency key is still being processed. "
                      "Retry after it completes.",
                      headers={"Retry-After": "1", **guard_headers(route, rec.expires_at)})


async def _wait(request: web.Request, deps: Deps, g: Guarded) -> web.StreamResponse:
    """Hold a retry until the first completes; re-claim on each wake-up or poll."""
    deadline = time.monotonic() + g.route.wait_timeout
    poll = 0.05
    deps.metrics.waiters.inc()
    try:
        while (left := deadline - time.monotonic()) > 0:
            await _sleep_until_notified(deps, g, min(poll, left))
            poll = min(poll * 2, 1.0)
            try:
                claim = await deps.store.claim(scope=g.scope, key=g.key,
                                               fingerprint=g.fingerprint, token=g.token,
                                               lease=g.route.lock_timeout, ttl=g.route.ttl)
            except StoreUnavailable as exc:
                return await _store_down(request, deps, g, exc)
            if claim.outcome is not ClaimOutcome.EXISTING or \
                    claim.record.state is not State.IN_FLIGHT:
                break
        else:
            _finish(deps, g, g.route, Outcome.CONFLICT, 409)
            raise KeyInFlight(f"The first request with this key did not complete within "
                              f"{g.route.wait_timeout:g}s.", headers={"Retry-After": "1"})
    finally:
        deps.metrics.waiters.dec()
    return await _answer(request, deps, g, claim)


async def _sleep_until_notified(deps: Deps, g: Guarded, timeout: float) -> None:
    if deps.notifier is None:
        await asyncio.sleep(timeout)
        return
    with deps.notifier.waiter(notify_channel_id(g.scope, g.key)) as fut:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(fut, timeout)


class _Heartbeat:
    """Keep a live claim's lease from running out under a slow upstream or a long body.

    Only a claim whose proxy is alive and still working is renewed, so a crashed or
    frozen owner's lease still ends and its key can be taken over.
    """

    def __init__(self, deps: Deps, g: Guarded) -> None:
        self._deps, self._g = deps, g
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(
            g.route.lock_timeout / 3, self._fire)
        self._task: asyncio.Task[None] | None = None

    def _fire(self) -> None:
        self._task = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        g = self._g
        try:
            if not await self._deps.store.extend(scope=g.scope, key=g.key, token=g.token,
                                                 lease=g.route.lock_timeout):
                return  # taken over or finished: nothing left to renew
        except StoreUnavailable as exc:
            log.warning("could not renew a lease: %s", exc)
        self._timer = self._loop.call_later(g.route.lock_timeout / 3, self._fire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()


async def _execute(request: web.Request, deps: Deps, g: Guarded,
                   claim: Claim) -> web.StreamResponse:
    deps.metrics.in_flight.inc()
    sent = False
    # A timer, not a task per request: most requests end long before the first renewal.
    heartbeat = _Heartbeat(deps, g)
    try:
        start = time.perf_counter()
        try:
            up = await open_upstream(request, deps.forwarder, body=g.body)
        except UpstreamError as exc:
            sent = exc.sent
            return await _upstream_failed(deps, g, claim, exc)
        sent = True
        deps.metrics.upstream_seconds.labels(g.route.name).observe(time.perf_counter() - start)
        try:
            if up.status in g.route.release_statuses:
                return await _pass_on_and_release(request, deps, g, up)
            return await _stream_and_record(request, deps, g, claim, up)
        finally:
            up.close()
    except asyncio.CancelledError:
        # Shutdown cut us off. Unsent: release so a retry forwards. Sent: the outcome is
        # unknown, so the claim stays until its lease ends (unknown_outcome decides then).
        if not sent:
            deps.spawn(_release_quietly(deps, g))
        raise
    finally:
        heartbeat.cancel()
        deps.metrics.in_flight.dec()


async def _release_quietly(deps: Deps, g: Guarded) -> None:
    try:
        await deps.store.release(scope=g.scope, key=g.key, token=g.token, notify=g.notify)
    except StoreUnavailable as exc:
        log.warning("could not release a claim (it ends with its lease): %s", exc)


async def _upstream_failed(deps: Deps, g: Guarded, claim: Claim,
                           exc: UpstreamError) -> web.StreamResponse:
    problem = exc.problem
    _finish(deps, g, g.route, Outcome.UPSTREAM_ERROR, problem.status)
    if not exc.sent:
        await _release_quietly(deps, g)
    elif g.route.unknown_outcome is UnknownOutcome.FAIL:
        await _complete(deps, g, _failure(problem))
    raise problem from exc


async def _fail_dead_claim(deps: Deps, g: Guarded) -> web.StreamResponse:
    """`unknown_outcome: fail` and the claim's proxy died: the first attempt may have
    reached the upstream, so store that unknown outcome as the answer, never forward."""
    problem = UpstreamFailed("The proxy handling the first request with this key stopped "
                             "before it finished; the outcome is unknown and this route "
                             "does not retry it.")
    _finish(deps, g, g.route, Outcome.UPSTREAM_ERROR, problem.status)
    await _complete(deps, g, _failure(problem))
    raise problem


def _failure(problem: ProblemError) -> Completion:
    """The stored answer for `unknown_outcome: fail`: the problem, replayed as is."""
    body = problem.body()
    return Completion(problem.status, (("Content-Type", "application/problem+json"),), body,
                      0, len(body), False)


async def _pass_on_and_release(request: web.Request, deps: Deps, g: Guarded,
                               up: UpstreamResponse) -> web.StreamResponse:
    await _release_quietly(deps, g)
    _finish(deps, g, g.route, Outcome.RELEASED, up.status)
    sink = ClientSink(request, response_for(up))
    await sink.start()
    try:
        async for chunk in up.chunks():
            await sink.write(chunk)
    except UpstreamError:
        sink.abort()
        return sink.response
    await sink.finish()
    return sink.response


async def _record_small(deps: Deps, g: Guarded, claim: Claim,
                        up: UpstreamResponse) -> web.StreamResponse:
    """A small body of known length: read it whole, store it, answer in one write."""
    route = g.route
    try:
        body = await up.read()
    except UpstreamError as exc:  # nothing reached the client yet: answer the problem
        _finish(deps, g, route, Outcome.UPSTREAM_ERROR, exc.problem.status)
        if route.unknown_outcome is UnknownOutcome.FAIL:
            await _complete(deps, g, _failure(exc.problem))
        raise exc.problem from exc
    stored = tuple(hdrs.to_store(up.headers, keep_set_cookie=route.replay_set_cookie))
    await _complete(deps, g, Completion(up.status, stored, body, 0, len(body), False),
                    retry_in_background=True)
    _finish(deps, g, route, Outcome.FORWARDED, up.status)
    return whole_response(up, body, guard_headers(route, claim.record.expires_at))


async def _stream_and_record(request: web.Request, deps: Deps, g: Guarded, claim: Claim,
                             up: UpstreamResponse) -> web.StreamResponse:
    """Stream to the client while recording; complete before the client sees the end."""
    route = g.route
    length = up.content_length
    if length is not None and length <= min(INLINE, route.max_stored_body):
        return await _record_small(deps, g, claim, up)
    sink = ClientSink(request, response_for(up, extra=guard_headers(
        route, claim.record.expires_at)))
    await sink.start()
    rec = Recorder(deps.store, scope=g.scope, key=g.key, token=g.token,
                   limit=route.max_stored_body)
    held = b""  # the last chunk waits until the result is stored: a client that has
    try:        # the whole answer must find the key completed when it retries at once
        async for chunk in up.chunks():
            await rec.add(chunk)
            await sink.write(held)
            held = chunk
    except UpstreamError as exc:
        # The upstream acted but its answer is incomplete: the outcome is unknown.
        log.error("upstream failed mid-body: %s", exc)
        _finish(deps, g, route, Outcome.UPSTREAM_ERROR, up.status)
        sink.abort()
        await rec.discard()
        if route.unknown_outcome is UnknownOutcome.FAIL:
            await _complete(deps, g, _failure(exc.problem))
        return sink.response
    stored = hdrs.to_store(up.headers, keep_set_cookie=route.replay_set_cookie)
    done = await rec.finish(status=up.status, headers=tuple(stored))
    await _complete(deps, g, done, retry_in_background=True)  # the client gets it anyway
    _finish(deps, g, route, Outcome.FORWARDED, up.status)
    await sink.write(held)
    await sink.finish()
    return sink.response


async def _complete(deps: Deps, g: Guarded, done: Completion, *,
                    retry_in_background: bool = False) -> bool:
    """Store the result once now; if the store is down, keep trying within the lease."""
    try:
        ok = await deps.store.complete(scope=g.scope, key=g.key, token=g.token, done=done,
                                          notify=g.notify)
    except StoreUnavailable as exc:
        log.warning("storing a result failed, retrying within the lease: %s", exc)
        deadline = time.monotonic() + g.route.lock_timeout * 0.9
        if retry_in_background:
            deps.spawn(_complete_retrying(deps, g, done, deadline))
        else:
            await _complete_retrying(deps, g, done, deadline)
        return False
    if not ok:
        log.warning("result not stored: the claim was taken over by another proxy",
                    extra={"fields": {"route": g.route.name, "key_hash": g.key_hash}})
    return ok


async def _complete_retrying(deps: Deps, g: Guarded, done: Completion,
                             deadline: float) -> None:
    delay = 0.2
    while time.monotonic() + delay < deadline:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
        try:
            await deps.store.complete(scope=g.scope, key=g.key, token=g.token, done=done,
                                          notify=g.notify)
            return
        except StoreUnavailable:
            continue
    deps.metrics.records_lost.labels(g.route.name).inc()
    log.error("record lost: the upstream answered but the result could not be stored "
              "within the lease", extra={"fields": {"route": g.route.name,
                                                    "key_hash": g.key_hash}})
