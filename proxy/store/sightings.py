"""What this process saw of other owners' in-flight claims, on its own monotonic clock.

A claim's lease is kept on the database's clock, and a step of that clock (NTP, a VM
resumed) can make a live lease look ended (issue #25, item 7). So a takeover needs a
second witness: the owner's heartbeat, which each renewal bumps (store/migrations/0009),
seen unchanged by the taker for a whole `lock_timeout` of the taker's own time. A live
owner renews every third of its lease, so its heartbeat moves well before that; only an
owner that stopped renewing (crashed, frozen, cut off) can be taken over.

Each guarded request that finds a claim in flight records what it saw; a later request
for the same key (a retry, a waiter polling) that finds the same (token, heartbeat) a
lease later presents it as evidence. Memory is bounded: the oldest sightings are dropped
past `limit`, which only delays a takeover, never allows one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from proxy.store import Beat

LIMIT = 10_000  # sightings kept; ~200 bytes each


class Sightings:
    """(scope, key) → the in-flight claim last seen there, and since when, unchanged."""

    __slots__ = ("_seen", "_limit", "_clock")

    def __init__(self, *, limit: int = LIMIT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._seen: dict[tuple[str, str], tuple[Beat, float]] = {}
        self._limit = limit
        self._clock = clock

    def __len__(self) -> int:
        return len(self._seen)

    def evidence(self, scope: str, key: str, *, lease: float) -> Beat | None:
        """The claim seen here unchanged for at least `lease` seconds of our own clock."""
        if not self._seen:  # the common case: nothing in flight was ever seen
            return None
        got = self._seen.get((scope, key))
        if got is None or self._clock() - got[1] < lease:
            return None
        return got[0]

    def saw(self, scope: str, key: str, beat: Beat) -> None:
        """A claim found in flight: remember it, keeping the first time it was seen as it
        is (a changed token or heartbeat starts the wait again)."""
        where = (scope, key)
        got = self._seen.get(where)
        if got is not None and got[0] == beat:
            return
        self._seen.pop(where, None)  # re-inserted last: the dict stays oldest first
        self._seen[where] = (beat, self._clock())
        if len(self._seen) > self._limit:
            del self._seen[next(iter(self._seen))]

    def forget(self, scope: str, key: str) -> None:
        """The key is no longer someone else's flight (ours now, completed, gone)."""
        if self._seen:
            self._seen.pop((scope, key), None)
