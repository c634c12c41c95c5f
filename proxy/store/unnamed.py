"""asyncpg connections that keep no session state, for a transaction-mode pooler.

Behind PgBouncer in `pool_mode = transaction`, consecutive transactions of one client
connection may run on different server connections, so nothing may outlive a
transaction on the server: no named prepared statement (asyncpg's statement cache names
every statement it prepares), no `SET`, no session advisory lock, no LISTEN.

With `statement_cache_size=0` asyncpg already uses the unnamed statement and re-sends its
Parse with every Bind, so each call is one Parse/Bind/Execute/Sync exchange that the
pooler keeps on one server connection: the protocol pattern libpq's `PQexecParams` uses,
which poolers support. But it still describes the statement first, one extra round trip
(and one more transaction for the pooler) per call. This class remembers each query's
description (parameter and result types; type OIDs are the same on every server of one
database, and on a promoted physical standby), so a call is one round trip, as it is
with named statements on a direct connection.

Two more session-state habits of asyncpg are turned off here: type introspection's
`set_config('jit', ..., false)` (a session-level SET, which would land on whichever
server the pooler picked), and cursors' named statements (they become unnamed too; a
cursor lives inside one transaction, so its Parse, Bind and Executes share a server).

This leans on asyncpg's private `_get_statement`; pyproject.toml pins the versions it was
tested with, and tests/test_pooler.py runs it through a real PgBouncer.
"""

from __future__ import annotations

from typing import Any

import asyncpg

MAX_REMEMBERED = 256  # distinct queries described per connection; the store uses ~20


class UnnamedStatementConnection(asyncpg.Connection):
    """An asyncpg connection whose statements are all unnamed and never left prepared."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._described: dict[tuple[Any, ...], Any] = {}
        # No SET behind a pooler: introspection must not toggle jit for the session.
        caps: Any = getattr(self, "_server_caps")  # noqa: B009 (private, untyped)
        self._server_caps = caps._replace(jit=False)

    async def _get_statement(self, query: str, timeout: float | None, *,
                             named: str | bool | None = False, use_cache: bool = True,
                             ignore_custom_codec: bool = False,
                             record_class: Any = None) -> Any:
        if isinstance(named, str):  # an explicit name: the caller asked for session state
            raise asyncpg.InterfaceError("named prepared statements are not available "
                                         "behind a transaction-mode pooler")
        key = (query, record_class, ignore_custom_codec)
        state = self._described.get(key)
        if state is None:
            # Cache disabled (statement_cache_size=0), not named: asyncpg prepares the
            # unnamed statement and marks it unprepared, so every Bind re-sends its Parse.
            base: Any = super()  # private asyncpg API: no stubs
            state = await base._get_statement(
                query, timeout, named=False, use_cache=False,
                ignore_custom_codec=ignore_custom_codec, record_class=record_class)
            if state.name:
                raise asyncpg.InterfaceError("expected an unnamed statement")
            if len(self._described) >= MAX_REMEMBERED:
                self._described.pop(next(iter(self._described)))
            self._described[key] = state
        return state

    def _drop_local_statement_cache(self) -> None:
        self._described.clear()
        base: Any = super()
        base._drop_local_statement_cache()
