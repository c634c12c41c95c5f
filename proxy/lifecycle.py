"""One process's serving life: the requests in flight, and the drain.

A drain (`POST /admin/drain`, `idemproxy drain --wait`, or SIGTERM) is one ordered
procedure, the same whoever starts it:

    1. DRAINING: /readyz answers 503 and new claims are refused (503 problem+json with
       Retry-After, nothing claimed, so the client's retry is safe on another replica);
       unguarded requests and replays still pass.
    2. Requests in flight finish (WebSocket tunnels aside: they are not counted).
    3. Background work finishes: completion retries and releases (Deps.tasks).
    4. DRAINED: `GET /drainz` answers 200, `idemproxy drain --wait` returns.

Readiness never depends on the shared store: a database outage would make every replica
unready at once and the Service would drop unguarded traffic too (the "deep health check
cascade"); guarded requests answer 503 themselves. `/readyz?store=1` adds the store for
operators who choose the other trade-off.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from typing import Any

POLL_S = 0.05  # how often a drain looks whether the last request has finished


class Phase(enum.Enum):
    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"


class Lifecycle:
    """Requests in flight in this process, and its drain (see the module docstring)."""

    def __init__(self) -> None:
        self.phase = Phase.SERVING
        self.requests = 0  # proxied requests in flight (tunnels aside)
        # What else a drain waits for: owned background tasks (set by create_app).
        self.background: Callable[[], int] = lambda: 0
        # The drain's work; the supervisor's stops its workers instead (each drains).
        self.work: Callable[[], Awaitable[None]] = self._until_idle
        self._task: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()

    @property
    def draining(self) -> bool:
        """Draining or drained: not ready, no new claims."""
        return self.phase is not Phase.SERVING

    def start_drain(self) -> None:
        """Begin the drain (again: nothing more to do)."""
        if self._task is None:
            self.phase = Phase.DRAINING
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def wait(self, timeout: float | None) -> bool:
        """Whether the drain is done within `timeout` (None: however long it takes)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._drained.wait()), timeout)
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        return {"state": self.phase.value, "requests_in_flight": self.requests,
                "background_tasks": self.background()}

    async def _drain(self) -> None:
        await self.work()
        self.phase = Phase.DRAINED
        self._drained.set()

    async def _until_idle(self) -> None:
        while self.requests or self.background():
            await asyncio.sleep(POLL_S)
