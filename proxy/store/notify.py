"""Wake waiters on any replica when a key completes or is released, and drop deleted
keys from every replica's replay cache.

One LISTEN connection per process (reconnected when it drops) fans notifications out to
in-process futures, so waiting costs no database connection per waiter. A lost wake-up
only costs latency: waiters also poll (see idempotency.py). A lost deletion could let a
cache replay a deleted key, so the cache is only on while this connection is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("idemproxy.notify")

CHANNEL = "idemproxy"
FORGET_CHANNEL = "idemproxy_forget"  # payload: md5 of scope and key (a deleted record)
LISTENER_NAME = "idemproxy-listen"  # the LISTEN connection's application_name


class Forgetting(Protocol):
    """What the notifier drives in the replay cache (proxy/flow/cache.py)."""

    def forget_id(self, ident: str) -> None: ...
    def set_live(self, live: bool) -> None: ...


class Notifier:
    """Owns the LISTEN connection and the waiters registered per key id."""

    def __init__(self, connect: Callable[[], Awaitable[Any]], *,
                 cache: Forgetting | None = None) -> None:
        self._connect = connect
        self._cache = cache
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

    def _on_forget(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if self._cache is not None:
            self._cache.forget_id(payload)

    def _set_cache_live(self, live: bool) -> None:
        if self._cache is not None:
            self._cache.set_live(live)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            conn = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notify)
                await conn.add_listener(FORGET_CHANNEL, self._on_forget)
                self._set_cache_live(True)  # deletions are heard from here on
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
                self._set_cache_live(False)
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
