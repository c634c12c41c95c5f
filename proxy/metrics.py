"""Prometheus collectors on a registry that is passed in (no global state).

Labels are low-cardinality only: route names from the config and fixed outcome names.
"""

from __future__ import annotations

import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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


_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "idemproxy_requests", "Requests by route and outcome.", ["route", "outcome"],
            registry=registry)
        self.upstream_seconds = Histogram(
            "idemproxy_upstream_seconds", "Time to the upstream's response headers.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.store_seconds = Histogram(
            "idemproxy_store_seconds", "Store round-trip time by operation.", ["op"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.in_flight = Gauge(
            "idemproxy_claims_in_flight", "Claims this process holds right now.",
            registry=registry)
        self.waiters = Gauge(
            "idemproxy_waiters", "Retries waiting for an in-flight key (concurrent: wait).",
            registry=registry)
        self.takeovers = Counter(
            "idemproxy_claims_taken_over", "Claims taken over after their lease ended.",
            ["route"], registry=registry)
        self.records_lost = Counter(
            "idemproxy_records_lost", "Responses the upstream gave that could not be stored.",
            ["route"], registry=registry)
        self.swept = Counter(
            "idemproxy_sweeper_deleted", "Expired records deleted by the sweeper.",
            registry=registry)

    def count(self, route: str, outcome: Outcome) -> None:
        self.requests.labels(route, outcome.value).inc()

    def observe_store(self, op: str, seconds: float) -> None:
        self.store_seconds.labels(op).observe(seconds)
