"""First come, first served: the connection slots of both connection pools (Postgres in
store/pool.py, the upstream in upstream_client.py).

A pool counts its connections (opening, lent or idle) against a maximum. When it can
neither lend an idle one nor open another, a caller waits in line. A connection given
back, or the slot of one that was closed, goes straight to the longest waiter, so a
newcomer can never take it from a waiter already woken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

C = TypeVar("C")


class Slots(Generic[C]):
    def __init__(self, maximum: int, *, keep_idle: Callable[[C], None]) -> None:
        self.maximum = maximum
        self.used = 0  # connections opening, lent or idle: never above maximum
        self._keep_idle = keep_idle  # where a connection given back goes when nobody waits
        self._waiters: deque[asyncio.Future[C | None]] = deque()

    @property
    def waiting(self) -> bool:
        return bool(self._waiters)

    def claim(self) -> bool:
        """Count one more connection, if under the maximum and nobody is in line."""
        if self.used < self.maximum and not self._waiters:
            self.used += 1
            return True
        return False

    async def wait(self, timeout: float) -> C | None:
        """Wait in line for a connection, or for None: a slot to open one in.
        TimeoutError after `timeout`; what arrives as we give up goes to the next."""
        fut: asyncio.Future[C | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.hand_over(fut.result())  # it arrived as we gave up: next in line
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise

    def hand_over(self, conn: C | None) -> None:
        """A connection given back, or (None) a closed one's slot, to the first live
        waiter; with nobody waiting, the connection is kept idle and a slot is freed."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)  # straight to the waiter: nobody can barge in
                return
        if conn is None:
            self.used -= 1
        else:
            self._keep_idle(conn)

    def fail_waiters(self, error: Callable[[], BaseException]) -> None:
        """The pool is closing: every waiter gets an `error()` of its own."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(error())
