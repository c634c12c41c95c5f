"""A database connection of its own for lease renewals on another thread (proxy/flow/leases.py).

The pool's connections belong to the main event loop; a renewal that must not wait for
that loop (a stalled loop is what it guards against, issue #25) runs on a thread with its
own loop and this one connection, opened when the first renewal is due and reopened after
a failure. Every failure is a StoreError, as for the store's own calls.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import asyncpg

from proxy.store.pool import store_error

# The renewal as a function (migrations 0008, 0009): it bumps the heartbeat, and with Citus
# it runs on the key's worker, whose clock set the lease.
_RENEW = "SELECT idemproxy_renew($1, $2, $3, $4)"


class SideConnection:
    """One connection, for one thread's event loop: renewals only."""

    def __init__(self, url: str, *, timeout: float, connect_args: dict[str, Any]) -> None:
        self._url = url
        self._timeout = timeout
        self._args = connect_args
        self._conn: Any = None

    async def extend(self, *, scope: str, key: str, token: UUID, lease: float) -> bool:
        """Renew a live claim's lease and bump its heartbeat; False if it is not ours."""
        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(self._url, timeout=self._timeout,
                                                   command_timeout=self._timeout, **self._args)
            renewed: bool = await self._conn.fetchval(_RENEW, scope, key, token, lease)
        except Exception as exc:
            await self.close()  # a connection whose call failed is never used again
            err = store_error(exc)
            if err is exc:
                raise
            raise err from exc
        return renewed

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close(timeout=self._timeout)
            except Exception:
                conn.terminate()
