"""`open_store(cfg)`: the store a configuration names, opened for the life of a block.

Its database URL, or (none given) an embedded PostgreSQL under `data_dir`. Used by
`serve`, the supervisor and every CLI command, so they connect the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from urllib.parse import parse_qs, urlsplit

from proxy.config import Config, Pooler, Sharding
from proxy.errors import StoreUnavailable
from proxy.store import OpenedStore
from proxy.store.postgres import PostgresStore

log = logging.getLogger("idemproxy")
T = TypeVar("T")


@contextlib.asynccontextmanager
async def open_store(cfg: Config, *, wait: float = 0.0,
                     observe: Callable[[str, float, float], None] | None = None,
                     observe_batch: Callable[[str, int], None] | None = None
                     ) -> AsyncIterator[OpenedStore]:
    """The store for `cfg`, retrying an unreachable database for up to `wait` seconds."""
    from proxy.embedded import embedded_postgres  # only when no URL: it starts a server

    with contextlib.ExitStack() as stack:
        url = cfg.database.url or stack.enter_context(embedded_postgres(cfg.data_dir))
        store = await retry_unavailable(lambda: PostgresStore.connect(
            url, min_size=cfg.database.pool_min, max_size=cfg.database.pool_max,
            timeout=cfg.database.timeout,
            transaction_pooler=cfg.database.pooler is Pooler.TRANSACTION,
            listen_url=cfg.database.listen_url or None,
            citus=cfg.database.sharding is Sharding.CITUS,
            observe=observe, observe_batch=observe_batch),
            wait=wait, where=where(url))
        try:
            yield store
        finally:
            await store.close()


def where(url: str) -> str:
    """`host:port/dbname` of a DSN for messages (each host of a multi-host one), never the
    user or the password."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2] or query.get("host", ["localhost"])[0]
    port = query.get("port", ["5432"])[0]
    named = [h if not h.startswith("/") and ":" in h.rpartition("]")[2] else f"{h}:{port}"
             for h in hosts.split(",")]  # a socket directory gets its port too
    return ",".join(named) + (parts.path if parts.path not in ("", "/") else "")


async def retry_unavailable(step: Callable[[], Awaitable[T]], *, wait: float, where: str,
                            what: str = "the database") -> T:
    """`step()`, retried once a second while the database is unreachable (StoreUnavailable),
    for up to `wait` seconds; then its error, naming `where`. Start-up's connection,
    migrations and installation secret all go through it, so a database blip while a
    replica starts is a wait, not an exit (a crash loop under Kubernetes)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    attempt = 0
    while True:
        attempt += 1
        try:
            return await step()
        except StoreUnavailable as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise StoreUnavailable(f"at {where}: {exc}") from exc
            # One line per attempt, so a start-up that waits says what for.
            log.warning("waiting for the database at %s for %s (attempt %d, giving up in "
                        "%.0fs): %s", where, what, attempt, left, exc)
            await asyncio.sleep(1)
