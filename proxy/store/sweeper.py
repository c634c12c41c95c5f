"""Delete expired rows in small batches; one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from proxy.errors import StoreError
from proxy.store import RuntimeStore

log = logging.getLogger("idemproxy.sweeper")

_LOCK_ID = 0x1DE3_5EE9
BATCH = 1000  # rows per transaction: short locks, and a pass that yields between them


class Sweepable(Protocol):
    """What a pass needs of PostgresStore (not imported: its `sweep` calls this module)."""

    def connection(self) -> AbstractAsyncContextManager[Any]: ...
    async def purge(self, *, batch: int = ..., conn: Any = ...) -> int: ...
    async def purge_orphans(self, *, batch: int = ..., conn: Any = ...) -> int: ...


async def sweep_once(store: Sweepable, *, batch: int = BATCH) -> int:
    """One pass: every expired row due, then every orphaned chunk, in batches of `batch`
    until a batch comes back short; the number of expired rows deleted.

    A pass drains everything due: it used to stop at 100 batches (100 k rows), below one
    proxy's first-request rate per `sweep_interval`, so expired rows piled up (issue 25).
    Each batch is one transaction that first tries a transaction-scoped advisory lock, so
    one replica at a time deletes and the others skip the pass (pooler-safe: nothing
    outlives the transaction). A replica that finds the lock taken stops its pass."""
    expired = await _drain(store, store.purge, batch)
    if expired is None:
        return 0
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


async def run_sweeper(store: RuntimeStore, *, interval: float,
                      on_deleted: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await store.sweep()
            if n:
                on_deleted(n)
                log.info("swept expired records", extra={"fields": {"deleted": n}})
        except StoreError as exc:
            log.warning("sweep skipped: %s", exc)
        except Exception:  # a sweeper bug must not take the proxy down
            log.exception("sweep failed")
