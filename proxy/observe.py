"""The observer seam: what happened, reported by the flow, the store and the runtime.

The flow never counts or logs an event itself: it tells its `Observer`, and observers
turn events into what they keep. The Prometheus metrics (proxy/metrics.py) and the one
log line per guarded request (proxy/logs.py) are observers; tracing is meant to be one
more, added without touching the flow (mitmproxy's addons are the model).

    request_done(verdict)          a request was answered: route, outcome, status, ...
    upstream_timed(route, s, e)    the upstream's response headers arrived (perf_counter)
    store_timed(op, s, e)          one store round trip (claim, complete, ...) ended
    store_batched(op, calls)       one statement carried `calls` queued calls
    takeover(route)                a claim was taken over after its lease ended
    record_lost(route)             an answer was given but never stored
    executing(delta)               a claim starts (+1) or stops (-1) executing here
    waiting(delta)                 a retry starts (+1) or stops (-1) waiting (concurrent: wait)
    cache_hit()                    a replay came from this process's replay cache
    unreadable(key_id)             a sealed piece could not be opened
    swept(count)                   the sweeper deleted `count` expired records

Times are `time.perf_counter()` readings, so an observer can place a span (start, end)
as well as a duration. Every method is called on the event loop, on the request's path:
an observer must be quick and must not raise.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol


class Outcome(enum.Enum):
    """How a request ended, as counted and logged."""

    FORWARDED = "forwarded"  # first request: executed upstream and stored
    REPLAYED = "replayed"
    CONFLICT = "conflict"  # 409: in flight
    MISMATCH = "mismatch"  # 422: different fingerprint
    REJECTED = "rejected"  # 4xx: bad key, too large, missing key
    PASS_THROUGH = "pass_through"  # no route or no key: unguarded
    RELEASED = "released"  # upstream answered a release status; not stored
    UPSTREAM_ERROR = "upstream_error"
    STORE_ERROR = "store_error"
    DRAINING = "draining"  # 503: this replica drains and takes no new claims


UNROUTED = "-"  # the route name of requests no route matched


class Verdict(NamedTuple):
    """How one request ended. A tuple: one is made per request, on the hot path."""

    route: str  # the route's name, or UNROUTED
    outcome: Outcome
    status: int  # the status answered (0: none yet known, e.g. a streamed pass-through)
    guarded: bool = False  # identified (key, tenant): the rest is set
    key_hash: str = ""  # the key's name in logs (a keyed hash), never the key
    tenant: str = ""  # the tenant's hash
    started: float = 0.0  # perf_counter when the guarded request began


UNROUTED_PASS_THROUGH = Verdict(UNROUTED, Outcome.PASS_THROUGH, 0)


class Observer(Protocol):
    """What the flow, the store and the runtime report (see the module docstring)."""

    def request_done(self, verdict: Verdict) -> None: ...
    def upstream_timed(self, route: str, start: float, end: float) -> None: ...
    def store_timed(self, op: str, start: float, end: float) -> None: ...
    def store_batched(self, op: str, calls: int) -> None: ...
    def takeover(self, route: str) -> None: ...
    def record_lost(self, route: str) -> None: ...
    def executing(self, delta: int) -> None: ...
    def waiting(self, delta: int) -> None: ...
    def cache_hit(self) -> None: ...
    def unreadable(self, key_id: str) -> None: ...
    def swept(self, count: int) -> None: ...


class BaseObserver:
    """Ignores every event: an observer subclasses it and overrides what it keeps."""

    def request_done(self, verdict: Verdict) -> None:
        pass

    def upstream_timed(self, route: str, start: float, end: float) -> None:
        pass

    def store_timed(self, op: str, start: float, end: float) -> None:
        pass

    def store_batched(self, op: str, calls: int) -> None:
        pass

    def takeover(self, route: str) -> None:
        pass

    def record_lost(self, route: str) -> None:
        pass

    def executing(self, delta: int) -> None:
        pass

    def waiting(self, delta: int) -> None:
        pass

    def cache_hit(self) -> None:
        pass

    def unreadable(self, key_id: str) -> None:
        pass

    def swept(self, count: int) -> None:
        pass


EVENTS = tuple(name for name in vars(BaseObserver) if not name.startswith("_"))


def _calls(observers: tuple[Observer, ...], event: str) -> Callable[..., None]:
    """One callable for `event`: the observers that handle it, called in order. Those that
    inherit BaseObserver's no-op are left out, and a single one is called directly, so
    the usual two observers cost one or two calls per event, not a loop."""
    noop = getattr(BaseObserver, event)
    methods = [getattr(o, event) for o in observers  # a Fanout's are instance attributes
               if event in getattr(o, "__dict__", ()) or getattr(type(o), event, None) is not noop]
    if not methods:
        return getattr(BaseObserver(), event)  # type: ignore[no-any-return]
    if len(methods) == 1:
        return methods[0]  # type: ignore[no-any-return]
    if len(methods) == 2:
        first, second = methods

        def both(*args: Any) -> None:
            first(*args)
            second(*args)
        return both

    def each(*args: Any) -> None:
        for method in methods:
            method(*args)
    return each


class Fanout(BaseObserver):
    """Several observers as one: each event goes to each observer, in the order given."""

    def __init__(self, observers: Iterable[Observer]) -> None:
        self.observers = tuple(observers)
        for event in EVENTS:  # instance attributes: one call, no dispatch per event
            setattr(self, event, _calls(self.observers, event))
