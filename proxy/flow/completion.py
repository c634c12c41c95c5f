"""Storing a claim's answer: once now, and if the store fails, retried in the background
until it lands, the claim is taken over, or the key's window ends (then the record is
lost: counted and logged, since the client got an answer no retry will replay)."""

from __future__ import annotations

import asyncio

from proxy.errors import StoreError
from proxy.flow.context import Deps, Guarded, log
from proxy.store import Completion

# The completion retry: quick at first (a failover usually takes a second or two), then
# once a second, so that once the store is back the write lands before a client's retry can
# take an ended lease over.
RETRY_FIRST, RETRY_MAX = 0.1, 1.0


async def complete(deps: Deps, g: Guarded, done: Completion) -> bool:
    """Store the result once now; if the store fails, keep trying in the background.

    True when stored now. The client's answer never waits for a retry: a retry of the
    client meanwhile finds the claim in flight (409, or it waits), then the replay.
    """
    try:
        ok = await deps.store.complete(scope=g.scope, key=g.key, token=g.token, done=done,
                                       notify=g.notify)
    except StoreError as exc:
        log.warning("storing a result failed, retrying: %s", exc,
                    extra={"fields": {"route": g.route.name, "key_hash": g.key_hash}})
        deps.spawn(complete_retrying(deps, g, done))
        return False
    if not ok:
        _lost(deps, g, "the claim was taken over by another proxy")
    return ok


async def complete_retrying(deps: Deps, g: Guarded, done: Completion, *,
                            first: float = RETRY_FIRST, most: float = RETRY_MAX) -> None:
    """Retry a failed completion until it lands, the claim is gone, or the window ends.

    The write is fenced by the claim's token, not by its lease: past the lease it still
    lands as long as no other proxy took the key over, so an outage longer than
    `lock_timeout` no longer forgets an answer that nobody re-executed. Only a takeover,
    the end of the key's window, or shutdown lose it (counted and logged).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    lease_end, window_end = started + g.route.lock_timeout, started + g.route.ttl
    warned = False
    delay = first
    try:
        while loop.time() + delay < window_end:
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)
            try:
                ok = await deps.store.complete(scope=g.scope, key=g.key, token=g.token,
                                               done=done, notify=g.notify)
            except StoreError:
                if not warned and loop.time() >= lease_end:
                    warned = True
                    log.error("result still not stored after lock_timeout: the lease has "
                              "ended, so a retry may take the key over and execute again; "
                              "still retrying", extra={"fields": {
                                  "route": g.route.name, "key_hash": g.key_hash}})
                continue
            if ok:
                log.info("result stored after a retry", extra={"fields": {
                    "route": g.route.name, "key_hash": g.key_hash,
                    "after_s": round(loop.time() - started, 2)}})
            else:
                _lost(deps, g, "the claim was taken over by another proxy")
            return
        _lost(deps, g, "the key's window ended before the store came back")
    except asyncio.CancelledError:
        _lost(deps, g, "the proxy shut down before the store came back")
        raise


def _lost(deps: Deps, g: Guarded, why: str) -> None:
    """An answer the client got that no retry will replay: a metric and an error line."""
    deps.observer.record_lost(g.route.name)
    log.error("record lost: the upstream answered but the result was not stored: %s", why,
              extra={"fields": {"route": g.route.name, "key_hash": g.key_hash}})
