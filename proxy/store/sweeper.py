"""Delete expired rows in small batches; one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from proxy.errors import StoreError
from proxy.store import Beat, RuntimeStore
from proxy.store.sightings import Sightings

log = logging.getLogger("idemproxy.sweeper")

_LOCK_ID = 0x1DE3_5EE9
BATCH = 1000  # rows per transaction: short locks, and a pass that yields between them


class Sweepable(Protocol):
    """What a pass needs of PostgresStore (not imported: its `sweep` calls this module)."""

    def connection(self) -> AbstractAsyncContextManager[Any]: ...
    async def purge(self, *, batch: int = ..., conn: Any = ...) -> int: ...
    async def purge_orphans(self, *, batch: int = ..., conn: Any = ...) -> int: ...
    async def dead_claims(self, *, batch: int, conn: Any) -> list[tuple[str, str, Beat]]: ...
    async def purge_dead(self, *, dead: list[tuple[str, str, Beat]], conn: Any) -> int: ...


async def sweep_once(store: Sweepable, *, batch: int = BATCH,
                     sightings: Sightings | None = None, lease: float = 0.0) -> int:
    """One pass: every expired row due, then every orphaned chunk, in batches of `batch`
    until a batch comes back short; the number of expired rows deleted.

    A pass drains everything due: it used to stop at 100 batches (100 k rows), below one
    proxy's first-request rate per `sweep_interval`, so expired rows piled up (issue 25).
    Each batch is one transaction that first tries a transaction-scoped advisory lock, so
    one replica at a time deletes and the others skip the pass (pooler-safe: nothing
    outlives the transaction). A replica that finds the lock taken stops its pass.

    Expired rows still in flight are deleted only with `sightings` (the running
    sweeper's): once this process saw one unchanged (same token and heartbeat) for `lease`
    seconds of its own clock, the longest `lock_timeout` of any route. The database's
    clock alone never ends a live flight (issue #25); without sightings (a one-off
    `idemproxy purge`) they are left to the sweeper."""
    dead = 0
    if sightings is not None:
        dead = await _locked(store, _dead_claims(store, sightings, lease), batch) or 0
    expired = await _drain(store, store.purge, batch)
    if expired is None:
        return dead
    expired += dead
    chunks = await _drain(store, store.purge_orphans, batch)
    if chunks:
        log.info("removed orphaned body chunks", extra={"fields": {"chunks": chunks}})
    return expired


async def _drain(store: Sweepable, purge: Callable[..., Awaitable[int]],
                 batch: int) -> int | None:
    """Batches of `purge` until one deletes fewer than `batch` (nothing more due, or the
    rest locked by a claim); None if another replica holds the sweep lock at the start."""
    total = 0
    while True:
        n = await _locked(store, purge, batch)
        if n is None:
            return total or None
        total += n
        if n < batch:
            return total
        await asyncio.sleep(0)  # between batches, the requests on this loop go first


async def _locked(store: Sweepable, purge: Callable[..., Awaitable[int]],
                  batch: int) -> int | None:
    """`purge(batch=..., conn=...)` under the sweep lock; None if another replica has it."""
    async with store.connection() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_ID):
            return None
        return await purge(batch=batch, conn=conn)


def _dead_claims(store: Sweepable, sightings: Sightings, lease: float
                 ) -> Callable[..., Awaitable[int]]:
    """A purge of the dead claims this process saw unchanged for `lease` of its clock."""
    async def purge(*, batch: int, conn: Any) -> int:
        dead = []
        for scope, key, beat in await store.dead_claims(batch=batch, conn=conn):
            if sightings.evidence(scope, key, lease=lease) == beat:
                dead.append((scope, key, beat))
                sightings.forget(scope, key)
            else:
                sightings.saw(scope, key, beat)
        return await store.purge_dead(dead=dead, conn=conn) if dead else 0
    return purge


def longest_lease(routes: Iterable[Any]) -> float:
    """The longest `lock_timeout` of the routes (60 s, the default, with none)."""
    return max((r.lock_timeout for r in routes), default=60.0)


async def run_sweeper(store: RuntimeStore, *, interval: float, lease: float,
                      on_deleted: Callable[[int], None]) -> None:
    """A pass every `interval`; `lease`: the longest lock_timeout of any route."""
    sightings = Sightings()
    while True:
        await asyncio.sleep(interval)
        try:
            n = await store.sweep(sightings=sightings, lease=lease)
            if n:
                on_deleted(n)
                log.info("swept expired records", extra={"fields": {"deleted": n}})
        except StoreError as exc:
            log.warning("sweep skipped: %s", exc)
        except Exception:  # a sweeper bug must not take the proxy down
            log.exception("sweep failed")
