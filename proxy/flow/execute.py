"""Forwarding a claimed request: send once, stream and record the answer, complete it
(or release the key, or store the unknown outcome), keeping the lease alive meanwhile
(context.Leases)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import tracectx
from proxy.config import Route
from proxy.errors import ProblemError, StoreError, UpstreamError, UpstreamFailed
from proxy.flow import decide
from proxy.flow.completion import complete as _complete
from proxy.flow.context import Deps, Guarded, finish, log
from proxy.flow.decide import OnAnswer, OnFailure
from proxy.flow.recorder import Recorder
from proxy.flow.relay import (
    ClientSink,
    open_upstream,
    pump,
    response_for,
    small_enough,
    whole_response,
)
from proxy.flow.replay import guard_headers, stream_stored
from proxy.http import cors
from proxy.http import headers as hdrs
from proxy.http.responses import with_reason
from proxy.observe import Outcome
from proxy.store import Claim, Completion, Record, State
from proxy.upstream import key as upstream_key
from proxy.upstream.forward import UpstreamResponse

RESEND_ATTEMPTS = 3  # re-sends after the first attempt (unknown_outcome: resend)
RESEND_BACKOFF = 0.1  # seconds before the first re-send, doubling: 0.1, 0.2, 0.4


async def execute(request: web.BaseRequest, deps: Deps, g: Guarded,
                  claim: Claim) -> web.StreamResponse:
    deps.observer.executing(1)
    sent = False
    deps.leases.hold(g)  # renewed by the process's one lease timer while it runs
    try:
        start = time.perf_counter()
        attempt = 0
        while True:  # one send; more only under unknown_outcome: resend (_resend_after)
            try:
                up = await open_upstream(request, deps.forwarder_for(g.route), body=g.body,
                                         set_headers=_upstream_key(deps, g))
                break
            except UpstreamError as exc:
                sent = sent or exc.sent  # an earlier attempt may have acted: still unknown
                attempt += 1
                if not await _resend_after(g, exc, sent=sent, attempt=attempt):
                    if sent and not exc.sent:
                        exc = UpstreamError(exc.problem, sent=True, answered=exc.answered)
                    return await _upstream_failed(deps, g, claim, exc)
        sent = True
        up = _ours_only(up, g.route)
        deps.observer.upstream_timed(g.route.name, start, time.perf_counter())
        try:
            route = g.route
            if decide.on_answer(up.status, release_statuses=route.release_statuses,
                                store_statuses=route.store_statuses) is OnAnswer.RELEASE:
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
        deps.leases.drop(g)
        deps.observer.executing(-1)


async def _resend_after(g: Guarded, exc: UpstreamError, *, sent: bool,
                        attempt: int) -> bool:
    """Under `unknown_outcome: resend`: after the `attempt`th send failed with its outcome
    unknown (timeout or reset once sent, by this or an earlier attempt), pause (0.1 s,
    doubling) and say to send again, with the same upstream key and the body in memory,
    up to RESEND_ATTEMPTS times; an upstream that dedupes on the key then answers the
    first attempt's result. False: no (more) re-sends, the failure stands."""
    verdict = decide.on_upstream_failure(
        sent=sent, answered=exc.answered, unknown_outcome=g.route.unknown_outcome,
        resends_left=RESEND_ATTEMPTS - attempt + 1)
    if verdict is not OnFailure.RESEND:
        return False
    log.warning("upstream outcome unknown; re-sending with the same upstream key",
                extra={"fields": {"route": g.route.name, "key_hash": g.key_hash,
                                  "attempt": attempt, "error": exc.problem.slug}})
    await asyncio.sleep(RESEND_BACKOFF * 2 ** (attempt - 1))
    return True


def _ours_only(up: UpstreamResponse, route: Route) -> UpstreamResponse:
    """The proxy's own markers (replay_header, omitted_header, expires_header) dropped
    from an upstream's answer: a first execution must never look like a replay, and the
    replay's marker is always the proxy's."""
    names = [n for n in (route.replay_header, route.expires_header, route.omitted_header)
             if n]
    if not any(n in up.headers for n in names):
        return up
    headers = CIMultiDict(up.headers)
    for name in names:
        headers.popall(name, None)
    return dataclasses.replace(up, headers=CIMultiDictProxy(headers))


def _upstream_key(deps: Deps, g: Guarded) -> dict[str, str] | None:
    """routes[].upstream_key: the same value on every attempt of this (scope, key), keyed
    by the installation secret (every replica's store shares it)."""
    name = g.route.upstream_key.header
    if name is None:
        return None
    secret = deps.sealer.upstream_key_secret
    return {name: upstream_key.derive(g.scope, g.key, secret=secret)}


async def _release_quietly(deps: Deps, g: Guarded) -> None:
    try:
        await deps.store.release(scope=g.scope, key=g.key, token=g.token, notify=g.notify)
    except StoreError as exc:
        log.warning("could not release a claim (it ends with its lease): %s", exc)


async def _upstream_failed(deps: Deps, g: Guarded, claim: Claim, exc: UpstreamError, *,
                           sent: bool | None = None) -> web.StreamResponse:
    """The upstream failed before anything reached the client: answer its problem (with
    the key's expiry), count it, then release, keep or store per decide (`sent`: known
    to have been sent, whatever the error says)."""
    problem = exc.problem
    problem.headers.update(guard_headers(g.route, claim.record.expires_at))
    finish(deps, g, g.route, Outcome.UPSTREAM_ERROR, problem.status)
    await _after_failure(deps, g, problem, sent=exc.sent if sent is None else sent,
                         answered=exc.answered)
    raise problem from exc


async def _after_failure(deps: Deps, g: Guarded, problem: ProblemError, *,
                         sent: bool, answered: bool = False) -> None:
    """Carry out decide.on_upstream_failure: release, keep the claim, or store the error."""
    verdict = decide.on_upstream_failure(sent=sent, answered=answered,
                                         unknown_outcome=g.route.unknown_outcome)
    if verdict is OnFailure.RELEASE:
        await _release_quietly(deps, g)
    elif verdict is OnFailure.STORE_FAILURE:
        await _complete(deps, g, _failure(problem))


async def fail_dead_claim(deps: Deps, g: Guarded, claim: Claim) -> web.StreamResponse:
    """`unknown_outcome: fail` and the claim's proxy died: the first attempt may have
    reached the upstream, so store that unknown outcome as the answer, never forward."""
    problem = UpstreamFailed("The proxy handling the first request with this key stopped "
                             "before it finished; the outcome is unknown and this route "
                             "does not retry it.",
                             headers=guard_headers(g.route, claim.record.expires_at))
    finish(deps, g, g.route, Outcome.UPSTREAM_ERROR, problem.status)
    await _complete(deps, g, _failure(problem))
    raise problem


def _failure(problem: ProblemError) -> Completion:
    """The stored answer for `unknown_outcome: fail`: the problem, replayed as is."""
    body = problem.body()
    return Completion(problem.status, (("Content-Type", "application/problem+json"),), body,
                      0, len(body), False)


async def _pass_on_and_release(request: web.BaseRequest, deps: Deps, g: Guarded,
                               up: UpstreamResponse) -> web.StreamResponse:
    await _release_quietly(deps, g)
    finish(deps, g, g.route, Outcome.RELEASED, up.status)
    sink = ClientSink(request, response_for(up))
    await sink.start()
    try:
        await pump(up.chunks(), sink)
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
        return await _upstream_failed(deps, g, claim, exc, sent=True)
    reply, stored = hdrs.reply_and_store(up.headers, keep_set_cookie=route.replay_set_cookie)
    stored = tracectx.with_origin(with_reason(up.status, up.reason, stored))
    seen = deps.cache.version if deps.cache is not None else 0
    if await _complete(deps, g, Completion(up.status, stored, body, 0, len(body), False)
                       ) and deps.cache is not None:
        deps.cache.put(g.scope, g.key, Record(
            State.COMPLETED, g.fingerprint, g.token, claim.record.expires_at, up.status,
            stored, body, 0, len(body), False), seen=seen)
    finish(deps, g, route, Outcome.FORWARDED, up.status)
    resp = whole_response(up, body, guard_headers(route, claim.record.expires_at),
                          headers=reply)
    cors.expose_for(route, resp.headers)
    return resp


async def _stream_and_record(request: web.BaseRequest, deps: Deps, g: Guarded, claim: Claim,
                             up: UpstreamResponse) -> web.StreamResponse:
    """Stream to the client while recording; complete before the client sees the end."""
    route = g.route
    if small_enough(request, up, limit=route.max_stored_body):
        return await _record_small(deps, g, claim, up)
    sink = ClientSink(request, response_for(up, extra=guard_headers(
        route, claim.record.expires_at)))
    cors.expose_for(route, sink.response.headers)
    await sink.start()
    rec = Recorder(deps.store, scope=g.scope, key=g.key, token=g.token,
                   limit=route.max_stored_body, spawn=deps.spawn)
    try:
        held = await pump(up.chunks(), sink, record=rec.add)
    except UpstreamError as exc:
        # The upstream acted but its answer is incomplete: its failure is the verdict.
        log.error("upstream failed mid-body: %s", exc)
        finish(deps, g, route, Outcome.UPSTREAM_ERROR, up.status)
        sink.abort()
        await rec.discard()
        await _after_failure(deps, g, exc.problem, sent=True, answered=exc.answered)
        return sink.response
    stored = hdrs.to_store(up.headers, keep_set_cookie=route.replay_set_cookie)
    done = await rec.finish(status=up.status,
                            headers=with_reason(up.status, up.reason, tuple(stored)))
    await _complete(deps, g, done)  # the client gets it anyway
    finish(deps, g, route, Outcome.FORWARDED, up.status)
    if sink.behind:
        await _catch_up(deps, g, sink, done)
        return sink.response
    await sink.write(held)
    await sink.finish()
    return sink.response


async def _catch_up(deps: Deps, g: Guarded, sink: ClientSink, done: Completion) -> None:
    """The client stopped reading and the recording went on without it (issue #25: its
    key stayed in flight as long as it liked): now that the answer is stored, give it
    the rest from the store, at its own pace (client.write_timeout bounds a stall)."""
    await sink.settle()
    if sink.gone:
        return
    if done.body_omitted:  # not stored (over max_stored_body, or the store failed)
        log.warning("a client that fell behind a recording cannot be caught up: the body "
                    "was not stored; its connection is cut", extra={"fields": {
                        "route": g.route.name, "key_hash": g.key_hash}})
        sink.abort()
        return
    if done.body is not None:  # stored inline
        await sink.write(done.body[sink.offered:])
        await sink.finish()
        return
    await stream_stored(sink, deps.store, scope=g.scope, key=g.key, token=g.token,
                        sealed=deps.sealer.encrypting, size=done.body_size)
