"""Prometheus collectors on a registry that is passed in (no global state), kept as an
observer of the flow (proxy/observe.py). The one module that imports prometheus_client.

Labels are low-cardinality only: route names from the config, fixed outcome names and
fixed store operation names. Never a key, a tenant or a path. Gauges sum over live
processes when `workers: N` runs prometheus_client's multiprocess mode (no pid label).

    idemproxy_requests_total{route,outcome}      every request the proxy answered
    idemproxy_request_seconds{route,outcome}     end to end, arrival to the answer handed
                                                 over (route "-": no route matched)
    idemproxy_upstream_seconds{route}            time to the upstream's response headers
    idemproxy_store_seconds{op}                  one store round trip (claim, complete, ...)
    idemproxy_store_batch_size{op}               calls per statement when calls queued (batch.py)
    idemproxy_claims_in_flight                   claims this process is executing now
    idemproxy_waiters                            retries held by `concurrent: wait`
    idemproxy_claims_taken_over_total{route}     claims taken over after their lease ended
    idemproxy_records_lost_total{route}          answers given but never stored
    idemproxy_sweeper_deleted_total              expired records the sweeper deleted
    idemproxy_client_write_timeouts_total        client connections ended by write_timeout
    idemproxy_records_unreadable_total{key_id}   sealed pieces that could not be opened
    idemproxy_db_pool_size / _idle / _max        the database pool, refreshed on scrape
    idemproxy_store_up                           1 if the store answered at the last
                                                 scrape (migrated), else 0
    idemproxy_build_info{version}                always 1
    process_*                                    CPU, memory, file descriptors (with
                                                 `workers: N`, the supervisor's)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)

from proxy import __version__
from proxy.fastmetrics import Children as _Children
from proxy.fastmetrics import Observe as _Observe
from proxy.fastmetrics import inc_of as _inc_of
from proxy.observe import UNROUTED, BaseObserver, Outcome, Verdict

__all__ = ["UNROUTED", "CollectorRegistry", "Metrics", "Outcome", "exposition",
           "mark_process_dead", "multiprocess_registry"]


class PoolStats(Protocol):
    """What the pool gauges read (asyncpg.Pool has these; no asyncpg import here)."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


class CacheStats(Protocol):
    """What the replay cache gauges read (proxy/flow/cache.py)."""

    @property
    def size_bytes(self) -> int: ...
    def __len__(self) -> int: ...


_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
# The (route, outcome) this request was counted under, for its duration (one task per
# request: a context variable is per request). None: refused before routing.
_COUNTED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "idemproxy_counted", default=None)
_UNCOUNTED = (UNROUTED, "rejected")


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """A scrape of `registry`: the body and its Content-Type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST


def multiprocess_registry() -> CollectorRegistry:
    """A registry that scrapes every process's shared files (`workers: N`), and the
    calling process's own process_* series (the supervisor's)."""
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=scrape)
    return scrape


def mark_process_dead(pid: int) -> None:
    """A worker died: its live gauges leave the multiprocess sums."""
    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics(BaseObserver):
    """The Prometheus collectors, and the observer that keeps them (proxy/observe.py)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "idemproxy_requests", "Requests by route and outcome.", ["route", "outcome"],
            registry=registry)
        self.request_seconds = Histogram(
            "idemproxy_request_seconds", "Proxied requests from arrival until the answer "
            "was handed over, by route and outcome.", ["route", "outcome"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.store_up = Gauge(
            "idemproxy_store_up", "1 if the store was reachable and migrated at the last "
            "scrape, else 0.", multiprocess_mode="livemax", registry=registry)
        self.upstream_seconds = Histogram(
            "idemproxy_upstream_seconds", "Time to the upstream's response headers.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.store_seconds = Histogram(
            "idemproxy_store_seconds", "Store round-trip time by operation.", ["op"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.store_batch_size = Histogram(
            "idemproxy_store_batch_size", "Calls one claim or complete statement carried, "
            "for statements run from the queue (calls that found a statement slot free "
            "run alone and are not counted here).", ["op"],
            buckets=(1, 2, 4, 8, 16, 32), registry=registry)
        self.in_flight = Gauge(
            "idemproxy_claims_in_flight", "Claims this instance is executing right now.",
            multiprocess_mode="livesum", registry=registry)
        self.waiters = Gauge(
            "idemproxy_waiters", "Retries waiting for an in-flight key (concurrent: wait).",
            multiprocess_mode="livesum", registry=registry)
        self.takeovers = Counter(
            "idemproxy_claims_taken_over", "Claims taken over after their lease ended.",
            ["route"], registry=registry)
        self.records_lost = Counter(
            "idemproxy_records_lost", "Responses the upstream gave that could not be stored.",
            ["route"], registry=registry)
        self.cache_hits = Counter(
            "idemproxy_replay_cache_hits", "Replays answered from the process's replay cache "
            "(no database round trip).", registry=registry)
        self.cache_bytes = Gauge(
            "idemproxy_replay_cache_bytes", "Bytes the replay caches hold (replay_cache).",
            multiprocess_mode="livesum", registry=registry)
        self.cache_entries = Gauge(
            "idemproxy_replay_cache_entries", "Completed responses the replay caches hold.",
            multiprocess_mode="livesum", registry=registry)
        self.records_unreadable = Counter(
            "idemproxy_records_unreadable", "Stored pieces that could not be opened (key "
            "not configured, or altered); each answered with an error, never re-executed.",
            ["key_id"], registry=registry)
        self.sweeper_deleted = Counter(
            "idemproxy_sweeper_deleted", "Expired records deleted by the sweeper.",
            registry=registry)
        self.write_timeouts = Counter(
            "idemproxy_client_write_timeouts", "Client connections ended because a write "
            "to them made no progress for client.write_timeout.", registry=registry)
        self.pool_size = Gauge(
            "idemproxy_db_pool_size", "Open connections in the database pool.",
            multiprocess_mode="livesum", registry=registry)
        self.pool_idle = Gauge(
            "idemproxy_db_pool_idle", "Idle connections in the database pool.",
            multiprocess_mode="livesum", registry=registry)
        self.pool_max = Gauge(
            "idemproxy_db_pool_max", "The database pool's maximum size (database.pool_max).",
            multiprocess_mode="livesum", registry=registry)
        self._requests = _Children(self.requests, _inc_of)
        self._durations = _Children(self.request_seconds, _Observe)
        self._upstream = _Children(self.upstream_seconds, _Observe)
        self._store_ops = _Children(self.store_seconds, _Observe)
        self._batch_sizes = _Children(self.store_batch_size, _Observe)
        self._in_flight = _inc_of(self.in_flight)
        # A gauge, not an Info: Info does not survive prometheus_client's multiprocess mode.
        Gauge("idemproxy_build_info", "The running idemproxy version (always 1).",
              ["version"], multiprocess_mode="livemax", registry=registry
              ).labels(__version__).set(1)
        ProcessCollector(registry=registry)

    def declare_routes(self, names: Iterable[str]) -> None:
        """Create every route × outcome series at zero, so rate() sees the first event."""
        for name in (*names, UNROUTED):
            for outcome in Outcome:
                self.requests.labels(name, outcome.value)
            self.takeovers.labels(name)
            self.records_lost.labels(name)

    def count_unreadable(self, key_id: str) -> None:
        self.records_unreadable.labels(key_id).inc()

    def count(self, route: str, outcome: Outcome) -> None:
        self._requests[route, outcome.value](1)
        _COUNTED.set((route, outcome.value))

    @staticmethod
    def begin_request() -> None:
        _COUNTED.set(None)

    def request_ended(self, seconds: float) -> None:
        """The request's duration, under the route and outcome it was counted as."""
        self._durations[_COUNTED.get() or _UNCOUNTED](seconds)

    def executing(self, delta: int) -> None:
        """A claim starts (+1) or stops (-1) executing here (idemproxy_claims_in_flight)."""
        self._in_flight(delta)

    def observe_upstream(self, route: str, seconds: float) -> None:
        self._upstream[route,](seconds)

    def observe_store(self, op: str, seconds: float) -> None:
        self._store_ops[op,](seconds)

    def observe_batch(self, op: str, calls: int) -> None:
        self._batch_sizes[op,](calls)

    # --- the observer (proxy/observe.py) --------------------------------------------------

    def request_done(self, verdict: Verdict) -> None:
        self.count(verdict.route, verdict.outcome)

    def upstream_timed(self, route: str, start: float, end: float) -> None:
        self._upstream[route,](end - start)

    def store_timed(self, op: str, start: float, end: float) -> None:
        self._store_ops[op,](end - start)

    def store_batched(self, op: str, calls: int) -> None:
        self._batch_sizes[op,](calls)

    def takeover(self, route: str) -> None:
        self.takeovers.labels(route).inc()

    def record_lost(self, route: str) -> None:
        self.records_lost.labels(route).inc()

    def waiting(self, delta: int) -> None:
        self.waiters.inc(delta)

    def cache_hit(self) -> None:
        self.cache_hits.inc()

    def unreadable(self, key_id: str) -> None:
        self.count_unreadable(key_id)

    def swept(self, count: int) -> None:
        self.sweeper_deleted.inc(count)

    def observe_cache(self, cache: CacheStats | None) -> None:
        """Refresh the replay cache gauges (with the pool's)."""
        if cache is not None:
            self.cache_bytes.set(cache.size_bytes)
            self.cache_entries.set(len(cache))

    def observe_pool(self, pool: PoolStats) -> None:
        """Refresh the pool gauges (called on each scrape)."""
        self.pool_size.set(pool.get_size())
        self.pool_idle.set(pool.get_idle_size())
        self.pool_max.set(pool.get_max_size())
