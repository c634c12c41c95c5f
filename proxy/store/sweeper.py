"""Delete expired rows in small batches; one replica at a time (advisory lock)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from proxy.errors import StoreUnavailable
from proxy.store.postgres import PostgresStore

log = logging.getLogger("idemproxy.sweeper")

_LOCK_ID = 0x1DE3_5EE9


async def sweep_once(store: PostgresStore, *, batch: int = 1000, max_batches: int = 100) -> int:
    """One pass if no other replica is sweeping: expired rows, then orphaned chunks."""
    async with store.connection() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_ID):
            return 0
        try:
            total = 0
            for _ in range(max_batches):
                n = await store.purge(batch=batch)
                total += n
                if n < batch:
                    break
            await store.purge_orphans(batch=batch)
            return total
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)


async def run_sweeper(store: PostgresStore, *, interval: float,
                      on_deleted: Callable[[int], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await sweep_once(store)
            if n:
                on_deleted(n)
                log.info("swept expired records", extra={"fields": {"deleted": n}})
        except StoreUnavailable as exc:
            log.warning("sweep skipped: %s", exc)
        except Exception:  # a sweeper bug must not take the proxy down
            log.exception("sweep failed")
