"""A first-come, first-served pool of asyncpg connections.

Why not asyncpg.Pool: every store call here is one statement on a borrowed connection,
and asyncpg's pool costs about as much as the statement itself (a task and a shield per
release, a reset round trip unless replaced, timeout machinery per acquire): measured,
~23 µs of CPU per call against ~11 µs for the query. Its queue also lets a newcomer take
a just-released connection while a woken waiter is still on its way, which starved some
requests for seconds under saturation (replay p99 ~900 ms in `make bench`).

This pool hands a released connection straight to the longest waiter, so service is
strictly in arrival order, and the common case (an idle connection, nobody waiting) is a
deque pop with no coroutine switch. A connection whose call failed in any way (an
SQL error of any class, a read-only server, a cancellation, a reset), or that was left
inside a transaction, is terminated rather than repaired or reused; the next borrower
opens a fresh one (which, with `target_session_attrs=read-write`, finds the primary). After a burst,
connections above `min_size` left unused for `MAX_IDLE` are closed as others come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from proxy.errors import StoreError, StoreFailed, StoreUnavailable, describe
from proxy.slots import Slots
from proxy.store.unnamed import UnnamedStatementConnection

# What a connection is, for this module: asyncpg's, untyped (asyncpg ships no stubs).
Conn = Any

# Failures of the connection or the server rather than of one statement: refused, reset,
# timed out, shutting down, out of resources, or not a primary (a read-only transaction on
# a standby or a demoted primary; no host matched target_session_attrs). They become
# StoreUnavailable; every other failure of a store call becomes StoreFailed.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
    asyncpg.exceptions.TargetServerAttributeNotMatched,
)


def unavailable(exc: BaseException) -> StoreUnavailable:
    """The StoreUnavailable a connection failure becomes (its cause attached)."""
    err = StoreUnavailable(describe(exc))
    err.__cause__ = exc
    return err


def store_error(exc: BaseException) -> BaseException:
    """What a failed store call raises: a StoreError, whatever the driver raised (its
    cause attached). A cancellation (or another BaseException) stays what it is."""
    if isinstance(exc, StoreError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, CONNECTION_ERRORS):
        return unavailable(exc)
    state = getattr(exc, "sqlstate", None)
    err = StoreFailed(f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")
                      + f": {exc}")
    err.__cause__ = exc
    return err


MAX_IDLE = 60.0  # seconds a connection above min_size may sit unused before it is closed


class Pool:
    def __init__(self, url: str, *, min_size: int, max_size: int, timeout: float,
                 transaction_pooler: bool = False) -> None:
        if max_size < 1 or min_size > max_size:
            raise ValueError(f"pool sizes: need 0 <= min_size <= max_size >= 1, "
                             f"got {min_size}, {max_size}")
        self.url = url
        self.timeout = timeout
        # Behind a transaction-mode pooler: no named prepared statements, no session state
        # (store/unnamed.py). Otherwise asyncpg's statement cache, as fast as it gets.
        self._connect_args: dict[str, Any] = (
            {"statement_cache_size": 0, "connection_class": UnnamedStatementConnection}
            if transaction_pooler else {})
        self._min = min_size
        self._idle: deque[Conn] = deque()
        self._slots: Slots[Conn] = Slots(max_size, keep_idle=self._keep_idle)
        self._open: set[Conn] = set()  # every connection this pool owns, idle or lent
        self._closed = False
        self._idle_since: dict[Conn, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def connect_args(self) -> dict[str, Any]:
        """How this pool's connections are opened (beyond URL and timeouts)."""
        return dict(self._connect_args)

    async def start(self) -> None:
        """Open `min_size` connections now, so a bad URL fails at start-up."""
        conns = [await self.acquire() for _ in range(self._min)]
        for conn in conns:
            self.release(conn)

    # PoolStats, for the gauges
    def get_size(self) -> int:
        return len(self._open)

    def get_idle_size(self) -> int:
        return len(self._idle)

    def get_max_size(self) -> int:
        return self._slots.maximum

    def take_nowait(self) -> Conn | None:
        """An idle connection if one is free and nobody is waiting; else None."""
        while self._idle and not self._slots.waiting:
            conn = self._idle.pop()  # the most recently used: its server backend is warm
            if not conn.is_closed():
                return conn
            self._forget(conn)
        return None

    async def acquire(self, timeout: float | None = None) -> Conn:
        """A connection, in arrival order; StoreUnavailable after `timeout` seconds."""
        if self._closed:
            raise StoreUnavailable("the database connection pool is closed")
        conn = self.take_nowait()
        if conn is not None:
            return conn
        if self._slots.claim():
            return await self._connect()
        wait = self.timeout if timeout is None else timeout
        try:
            conn = await self._slots.wait(wait)
        except TimeoutError:
            raise StoreUnavailable(f"no database connection free within {wait:g}s") from None
        if conn is None:  # a slot, not a connection: a broken one was dropped
            return await self._connect()
        return conn

    def release_after(self, conn: Conn, exc: BaseException) -> BaseException:
        """Drop a connection whose call failed with `exc`; what to raise instead.

        Whatever the failure (an SQL error of any class, a read-only server, cancelled,
        reset, timed out mid-call), the connection is never lent again: it may be out of
        step, hold a broken statement, or point at a server that is no longer primary."""
        self.release(conn, discard=True)
        return store_error(exc)

    def release(self, conn: Conn, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or a dirty connection) terminates it."""
        if discard or self._closed or conn.is_closed() or conn.is_in_transaction():
            self._forget(conn)  # its slot goes to the next in line
            conn.terminate()
            return
        self._slots.hand_over(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """Borrow a connection for a block; it is terminated if the block fails in any way
        or leaves a transaction open."""
        conn = await self.acquire()
        try:
            yield conn
        except BaseException:
            self.release(conn, discard=True)
            raise
        self.release(conn)

    async def close(self) -> None:
        """Close idle connections, terminate lent ones, fail every waiter."""
        self._closed = True
        self._slots.fail_waiters(
            lambda: StoreUnavailable("the database connection pool is closed"))
        idle, self._idle = list(self._idle), deque()
        if idle:  # politely, all at once, within one timeout; then the hard way
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(
                    *(c.close() for c in idle), return_exceptions=True), self.timeout)
        for task in list(self._closing):  # connections aged out a moment ago
            task.cancel()
        for conn in list(self._open):
            conn.terminate()
        self._open.clear()
        self._slots.used = 0

    # ---

    async def _connect(self) -> Conn:
        """Open a connection into a slot already counted."""
        try:
            conn = await asyncpg.connect(self.url, timeout=self.timeout,
                                         command_timeout=self.timeout, **self._connect_args)
        except BaseException as exc:
            self._slots.hand_over(None)  # the next in line tries its own luck
            err = store_error(exc)
            if err is exc:
                raise
            raise err from exc
        if self._closed:
            conn.terminate()
            raise StoreUnavailable("the database connection pool is closed")
        self._open.add(conn)
        return conn

    def _keep_idle(self, conn: Conn) -> None:
        """A connection given back with nobody waiting for it."""
        now = time.monotonic()
        self._idle.append(conn)
        self._idle_since[conn] = now
        # The least recently used idle connection is at the bottom of the stack: after a
        # burst, connections above min_size that nobody needed for MAX_IDLE are closed.
        oldest = self._idle[0]
        if (now - self._idle_since.get(oldest, now) > MAX_IDLE
                and len(self._open) > self._min):
            self._idle.popleft()
            self._forget(oldest)
            task = asyncio.get_running_loop().create_task(self._close_quietly(oldest))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, conn: Conn) -> None:
        try:
            await conn.close(timeout=self.timeout)
        except asyncio.CancelledError:  # the pool closed meanwhile: the hard way
            conn.terminate()
            raise
        except Exception:
            conn.terminate()

    def _forget(self, conn: Conn) -> None:
        self._idle_since.pop(conn, None)
        if conn in self._open:
            self._open.discard(conn)
            self._slots.hand_over(None)

