"""Delete expired rows in small batches; one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proxy.errors import StoreError
from proxy.store.postgres import PostgresStore

log = logging.getLogger("idemproxy.sweeper")

_LOCK_ID = 0x1DE3_5EE9


async def sweep_once(store: PostgresStore, *, batch: int = 1000, max_batches: int = 100) -> int:
    """One pass: expired rows, then orphaned chunks, in batches of `batch`.

    Each batch is one transaction that first tries a transaction-scoped advisory lock, so
    one replica at a time deletes and the others skip the pass (pooler-safe: nothing
    outlives the transaction). A replica that finds the lock taken stops its pass."""
    total = 0
    for _ in range(max_batches):
        n = await _locked(store, store.purge, batch)
        if n is None:
            return total
        total += n
        if n < batch:
            break
    await _locked(store, store.purge_orphans, batch)
    return total


async def _locked(store: PostgresStore, purge: Callable[..., Awaitable[int]],
                  batch: int) -> int | None:
    """`purge(batch=..., conn=...)` under the sweep lock; None if another replica has it."""
    async with store.connection() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _LOCK_ID):
            return None
        return await purge(batch=batch, conn=conn)


async def run_sweeper(store: PostgresStore, *, interval: float,
                      on_deleted: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await sweep_once(store)
            if n:
                on_deleted(n)
                log.info("swept expired records", extra={"fields": {"deleted": n}})
        except StoreError as exc:
            log.warning("sweep skipped: %s", exc)
        except Exception:  # a sweeper bug must not take the proxy down
            log.exception("sweep failed")
