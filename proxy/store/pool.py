"""A first-come, first-served pool of asyncpg connections.

Why not asyncpg.Pool: every store call here is one statement on a borrowed connection,
and asyncpg's pool costs about as much as the statement itself (a task and a shield per
release, a reset round trip unless replaced, timeout machinery per acquire): measured,
~23 µs of CPU per call against ~11 µs for the query. Its queue also lets a newcomer take
a just-released connection while a woken waiter is still on its way, which starved some
requests for seconds under saturation (replay p99 ~900 ms in `make bench`).

This pool hands a released connection straight to the longest waiter, so service is
strictly in arrival order, and the common case (an idle connection, nobody waiting) is a
deque pop with no coroutine switch. A connection that may be out of step with the server
(the call was cancelled or failed below SQL, or it was left inside a transaction) is
terminated rather than repaired; the next borrower opens a fresh one. After a burst,
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

from proxy.errors import StoreUnavailable
from proxy.slots import Slots

# What a connection is, for this module: asyncpg's, untyped (asyncpg ships no stubs).
Conn = Any

# Failures of the connection, not of the SQL: refused, reset, timed out, server shutting
# down. They become StoreUnavailable; SQL errors are bugs and propagate as they are.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


def unavailable(exc: BaseException) -> StoreUnavailable:
    """The StoreUnavailable a connection failure becomes (its cause attached)."""
    err = StoreUnavailable(f"{type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


MAX_IDLE = 60.0  # seconds a connection above min_size may sit unused before it is closed


class Pool:
    def __init__(self, url: str, *, min_size: int, max_size: int, timeout: float) -> None:
        if max_size < 1 or min_size > max_size:
            raise ValueError(f"pool sizes: need 0 <= min_size <= max_size >= 1, "
                             f"got {min_size}, {max_size}")
        self.url = url
        self.timeout = timeout
        self._min = min_size
        self._idle: deque[Conn] = deque()
        self._slots: Slots[Conn] = Slots(max_size, keep_idle=self._keep_idle)
        self._open: set[Conn] = set()  # every connection this pool owns, idle or lent
        self._closed = False
        self._idle_since: dict[Conn, float] = {}
        self._closing: set[asyncio.Task[None]] = set()

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
        """Give a connection back after a call failed with `exc`; what to raise instead.

        A server-reported SQL error leaves the connection in step; anything else
        (cancelled, reset, timed out mid-call) may not, so it is never lent again."""
        self.release(conn, discard=not _in_step(exc))
        return unavailable(exc) if isinstance(exc, CONNECTION_ERRORS) else exc

    def release(self, conn: Conn, *, discard: bool = False) -> None:
        """Give a connection back; `discard` (or a dirty connection) terminates it."""
        if discard or self._closed or conn.is_closed() or conn.is_in_transaction():
            self._forget(conn)  # its slot goes to the next in line
            conn.terminate()
            return
        self._slots.hand_over(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """Borrow a connection for a block; it is terminated if the block fails below
        SQL (a connection error, a cancellation) or leaves a transaction open."""
        conn = await self.acquire()
        try:
            yield conn
        except BaseException as exc:
            self.release(conn, discard=not _in_step(exc))
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
                                         command_timeout=self.timeout)
        except BaseException:
            self._slots.hand_over(None)  # the next in line tries its own luck
            raise
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


def _in_step(exc: BaseException) -> bool:
    """After a call failed with `exc`, is the connection still in step with the server?
    A server-reported SQL error leaves it so; anything else (cancelled, reset, timed out
    mid-call) may not."""
    return isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, CONNECTION_ERRORS)
