"""Claims and completions go to Postgres in batches under load (group commit).

A first request costs Postgres two transactions, and with synchronous commit about half
of its CPU is the commits. A call runs alone, at once, when no statement of its kind
(claim, or completion) is running and a pooled connection is free: nothing is added at
low load. Otherwise it queues, and when the running statement ends the next one takes the
whole queue (up to `MAX_BATCH`) as one statement and one transaction (store/migrations/
0004): group commit. A call waits at most for one statement of its kind to finish before
its own starts. Under load, N commits and N round trips become one, and the rest of the
pool stays free for chunks, releases and the admin API. pgbench, first-request pairs:
9.2k/s alone, 31.4k/s in batches of eight. First requests through the proxy, 4 A/B pairs
in one session: `LIMIT` 1 ~5.7k req/s (proxy ~137 µs, Postgres ~63 µs of CPU each)
against `LIMIT` 2 ~4.9k (~160 and ~84 µs); earlier, `LIMIT` 2 against the whole pool
of 10: ~185 against ~205 µs of proxy CPU.

Why it keeps every promise of the calls it replaces:
  * each element runs the same SQL as a call on its own, and a batch is all or nothing;
  * a batch takes its row locks in (scope, key) order, the same order in every batch in
    every process, so batches cannot deadlock one another;
  * if a batch fails with an SQL error (say a deadlock with an operator's statement), it
    has been rolled back whole, and each call is re-run alone, each on a connection of
    its own: one bad call fails alone (with StoreFailed);
  * a connection failure (or a read-only server) fails every call in the batch with
    StoreUnavailable, as it would have failed each alone;
  * a connection whose statement failed is dropped, never lent again;
  * a caller that gives up while still queued is dropped from the batch: its statement
    never runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from proxy.errors import StoreError, StoreFailed, StoreUnavailable
from proxy.store.pool import Conn, Pool, store_error

log = logging.getLogger("idemproxy.store")

MAX_BATCH = 32  # calls per statement; pgbench gained little beyond 16
LIMIT = 1  # statements of one kind at once per process; more calls wait for the next batch

T = TypeVar("T", bound=tuple[object, ...])
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs `one(conn, item)` for a caller, or `many(conn, items)` for a queue of them."""

    def __init__(self, pool: Pool, *, op: str,
                 one: Callable[[Conn, T], Awaitable[R]],
                 many: Callable[[Conn, list[T]], Awaitable[Sequence[R]]],
                 order: Callable[[T], tuple[Any, ...]],
                 observe: Callable[[str, float, float], None],
                 observe_batch: Callable[[str, int], None],
                 max_batch: int = MAX_BATCH, limit: int = LIMIT) -> None:
        self._pool = pool
        self._op = op
        self._one = one
        self._many = many
        self._order = order
        self._observe = observe
        self._observe_batch = observe_batch
        self._max = max_batch
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._waiting = False  # a flusher is waiting for a connection for the queue
        self._busy = 0  # statements of this kind running, or waiting for a connection
        self._limit = limit
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, item: T) -> R:
        start = time.perf_counter()
        try:
            if not self._queue and self._busy < self._limit:
                conn = self._pool.take_nowait()
                if conn is not None:
                    self._busy += 1
                    try:
                        result = await self._one(conn, item)
                    except BaseException as exc:
                        err = self._pool.release_after(conn, exc)
                        if err is exc:
                            raise
                        raise err from exc
                    finally:
                        self._busy -= 1
                        self._kick()
                    self._pool.release(conn)
                    return result
            fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._queue.append((item, fut))
            self._kick()
            return await fut  # a cancelled caller cancels fut: the flusher drops it
        finally:
            self._observe(self._op, start, time.perf_counter())

    async def close(self) -> None:
        """Stop the flushers; every call still queued fails with StoreUnavailable."""
        self._limit = 0  # nothing new starts
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _fail(self._take(len(self._queue)), StoreUnavailable("the store is closing"))

    # ---

    def _kick(self) -> None:
        """Start a flusher for the queue if none is starting and a statement may run."""
        if self._queue and not self._waiting and self._busy < self._limit:
            self._waiting = True
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self, n: int) -> list[tuple[T, asyncio.Future[R]]]:
        """Up to n queued calls whose callers still wait."""
        batch: list[tuple[T, asyncio.Future[R]]] = []
        while self._queue and len(batch) < n:
            item, fut = self._queue.popleft()
            if not fut.done():
                batch.append((item, fut))
        return batch

    async def _flush(self) -> None:
        try:
            try:
                conn = await self._pool.acquire()
            finally:
                self._waiting = False
        except BaseException as exc:
            self._busy -= 1
            _fail(self._take(len(self._queue)), exc)
            if not isinstance(exc, Exception):
                raise
            return
        batch = self._take(self._max)
        if not batch:
            self._pool.release(conn)
            self._busy -= 1
            self._kick()
            return
        try:
            batch.sort(key=lambda call: self._order(call[0]))  # one lock order
            self._observe_batch(self._op, len(batch))
            await self._run(conn, batch)
        except BaseException as exc:
            _fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy -= 1
            self._kick()

    async def _run(self, conn: Conn, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Run a batch on `conn` and give the connection back (dropped if it failed)."""
        try:
            if len(batch) == 1:
                results: Sequence[R] = [await self._one(conn, batch[0][0])]
            else:
                results = await self._many(conn, [item for item, _ in batch])
        except BaseException as exc:
            err = self._pool.release_after(conn, exc)
            if len(batch) > 1 and isinstance(err, StoreFailed):
                log.warning("a batch of %d %s calls failed (%s); running each alone",
                            len(batch), self._op, type(exc).__name__)
                await self._alone(batch)
                return
            if err is exc:
                raise
            raise err from exc
        self._pool.release(conn)
        if len(results) != len(batch):
            raise StoreFailed(f"{self._op} batch of {len(batch)} answered "
                              f"{len(results)} rows")
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _alone(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Each call of a failed batch on a fresh connection, one after the other."""
        for i, (item, fut) in enumerate(batch):
            if fut.done():
                continue
            try:
                conn = await self._pool.acquire()
            except BaseException as exc:
                _fail(batch[i:], exc)
                if not isinstance(exc, Exception):
                    raise
                return
            try:
                result = await self._one(conn, item)
            except BaseException as exc:
                err = self._pool.release_after(conn, exc)
                if not isinstance(exc, Exception):
                    _fail(batch[i:], exc)
                    raise
                if not fut.done():
                    fut.set_exception(err)
                continue
            self._pool.release(conn)
            if not fut.done():
                fut.set_result(result)


def _fail(batch: Sequence[tuple[object, asyncio.Future[R]]], exc: BaseException) -> None:
    """Fail every waiting caller with a StoreError of its own (never a cancellation:
    the store closing is an outage to them)."""
    err = store_error(exc)
    for _, fut in batch:
        if fut.done():
            continue
        if isinstance(err, StoreError):
            mine = type(err)(str(err))  # one instance per caller
            mine.__cause__ = err.__cause__
            fut.set_exception(mine)
        else:
            fut.set_exception(StoreUnavailable("the store call was interrupted"))
