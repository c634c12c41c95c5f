"""Wake waiters on any replica when a key completes or is released.

One LISTEN connection per process (reconnected when it drops) fans notifications out to
in-process futures, so waiting costs no database connection per waiter. A lost
notification only costs latency: waiters also poll (see idempotency.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("idemproxy.notify")

CHANNEL = "idemproxy"


class Notifier:
    """Owns the LISTEN connection and the waiters registered per key id."""

    def __init__(self, connect: Callable[[], Awaitable[Any]]) -> None:
        self._connect = connect
        self._waiters: dict[str, set[asyncio.Future[None]]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def __aenter__(self) -> Notifier:
        self._task = asyncio.create_task(self._run(), name="idemproxy-listen")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @contextlib.contextmanager
    def waiter(self, key_id: str) -> Any:
        """A future resolved when `key_id` is notified; unregistered on exit."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[key_id].add(fut)
        try:
            yield fut
        finally:
            waiters = self._waiters.get(key_id)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[key_id]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for fut in self._waiters.get(payload, ()):
            if not fut.done():
                fut.set_result(None)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                self.connected.set()
                delay = 0.1
                self._wake_all()  # notifications may have been missed while away
                while not lost.is_set():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(lost.wait(), timeout=5)
                    if not lost.is_set() and conn.is_closed():
                        break
                    if not lost.is_set():
                        await conn.execute("SELECT 1")  # notice a dead socket promptly
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: reconnect with backoff
                log.warning("listen connection lost: %s", type(exc).__name__)
            finally:
                self.connected.clear()
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
