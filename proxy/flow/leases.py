"""Keep the leases of the claims this process executes from running out.

Renewals run on a thread of their own, with their own event loop and database connection
(`Store.side()`), so nothing on the main event loop delays them: not a CPU-heavy request,
not a long garbage collection (issue #25: three 9.4 MB webhook bodies canonicalised on the
loop froze a replica for 24 s, its 3 s leases ended, and a retry on another replica ran the
key again). Every claim is renewed once a third of its lease has passed since it was taken
or last renewed, so by half its lease at the latest, and each renewal bumps the claim's
heartbeat (the evidence a taker needs, proxy/store/sightings.py).

Only a live process renews, and only the claims it still executes: a crashed or frozen
(SIGSTOP) process renews nothing, and its keys can be taken over once its leases end. A
process whose main loop shows no life for `WEDGED` seconds (stuck, not merely busy) stops
renewing too, and says so. The thread starts with the first claim held and ends after
`IDLE` seconds with none, closing its connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from proxy.config import Route
from proxy.errors import StoreError
from proxy.store import SideStore, Store

log = logging.getLogger("idemproxy.leases")

IDLE = 10.0  # seconds with no claim held before the thread ends
WEDGED = 300.0  # seconds without a sign of life from the main loop: stop renewing
PULSE = 1.0  # how often the main loop shows it is alive while claims are held


class Guarded(Protocol):
    """What a held claim is (context.Guarded, not imported: it holds a Leases)."""

    route: Route
    scope: str
    key: str
    token: uuid.UUID


@dataclass(slots=True)
class _Held:
    scope: str
    key: str
    token: uuid.UUID
    lease: float
    due: float  # time.monotonic() of the next renewal


class Leases:
    """The claims this process executes, renewed from a thread of their own."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._held: dict[uuid.UUID, _Held] = {}
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._wake_at = math.inf  # when the thread means to wake next
        self._alive = time.monotonic()  # the main loop's last sign of life
        self._pulse: asyncio.TimerHandle | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, g: Guarded) -> None:
        """Renew g's lease while it executes, until `drop(g)`."""
        now = time.monotonic()
        due = now + g.route.lock_timeout / 3
        with self._cond:
            self._held[g.token] = _Held(g.scope, g.key, g.token, g.route.lock_timeout, due)
            self._alive = now
            if due < self._wake_at:
                self._cond.notify()
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="idemproxy-leases",
                                                daemon=True)
                self._thread.start()
        if self._pulse is None:
            self._pulse = asyncio.get_running_loop().call_later(PULSE, self._beat)

    def drop(self, g: Guarded) -> None:
        with self._cond:
            self._held.pop(g.token, None)

    async def aclose(self) -> None:
        """Stop renewing and end the thread (at shutdown: what is still held is left to
        its lease)."""
        with self._cond:
            self._closed = True
            self._held.clear()
            self._cond.notify()
            thread = self._thread
        if self._pulse is not None:
            self._pulse.cancel()
        if thread is not None:
            await asyncio.to_thread(thread.join)

    def _beat(self) -> None:
        """On the main loop: it is alive. Repeats while claims are held."""
        self._pulse = None
        self._alive = time.monotonic()
        if self._held and not self._closed:
            self._pulse = asyncio.get_running_loop().call_later(PULSE, self._beat)

    # --- the thread ---

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        side = self._store.side()
        try:
            while (due := self._next_due()) is not None:
                loop.run_until_complete(self._renew(side, due))
        finally:
            loop.run_until_complete(side.close())
            loop.close()

    def _next_due(self) -> list[_Held] | None:
        """Wait until some claims are due (None: time to end the thread)."""
        idle_since = None
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._held:
                    idle_since = None
                    due = [h for h in self._held.values() if h.due <= now]
                    if due and now - self._alive < WEDGED:
                        return due
                    if due:
                        log.error("the event loop has shown no life for %.0fs: no longer "
                                  "renewing %d leases", now - self._alive, len(due))
                        for h in due:
                            h.due = math.inf
                    self._wake_at = min(h.due for h in self._held.values())
                elif idle_since is None:
                    idle_since, self._wake_at = now, now + IDLE
                elif now - idle_since >= IDLE:
                    break
                self._cond.wait(max(0.0, min(self._wake_at - now, IDLE)))
            self._thread, self._wake_at = None, math.inf
            return None

    async def _renew(self, side: SideStore, due: list[_Held]) -> None:
        for i, h in enumerate(due):
            try:
                ok = await side.extend(scope=h.scope, key=h.key, token=h.token,
                                       lease=h.lease)
            except StoreError as exc:
                log.warning("could not renew a lease: %s", exc)
                for later in due[i:]:  # the store is down: this round ends, retried soon
                    later.due = time.monotonic() + later.lease / 6
                return
            # not ours any more (completed, or taken over): nothing left to renew
            h.due = time.monotonic() + h.lease / 3 if ok else math.inf
