"""proxy/metrics.py's per-request updates skip prometheus_client's wrappers: what a
scrape shows must be what the library's own inc/observe would have shown."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from proxy.metrics import Metrics, Outcome

# at, between and beyond the latency buckets' bounds, and zero
SECONDS = [0.0, 0.001, 0.0015, 0.0025, 0.004, 0.05, 0.7, 1.0, 29.9, 30.0, 31.0, 1e9]


def _scrape(registry: CollectorRegistry) -> list[str]:
    # process_* (CPU seconds, memory) describe this process and move between two scrapes
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if not line.startswith(("#", "process_")) and "_created" not in line)


def test_fast_updates_scrape_as_the_library_would():
    """Counts, the in-flight gauge and every histogram (latencies on and between bucket
    bounds, batch sizes) scrape the same through Metrics' updates as through
    prometheus_client's public inc/dec/observe."""
    fast_reg, slow_reg = CollectorRegistry(), CollectorRegistry()
    fast, slow = Metrics(fast_reg), Metrics(slow_reg)
    for i, s in enumerate(SECONDS):
        fast.count("charges", Outcome.FORWARDED)
        slow.requests.labels("charges", "forwarded").inc()
        fast.observe_store("claim", s)
        slow.store_seconds.labels("claim").observe(s)
        fast.observe_upstream("charges", s)
        slow.upstream_seconds.labels("charges").observe(s)
        fast.observe_batch("complete", i % 40)
        slow.store_batch_size.labels("complete").observe(i % 40)
        fast.executing(1)
        slow.in_flight.inc()
        if i % 3 == 0:
            fast.executing(-1)
            slow.in_flight.dec()
    assert _scrape(fast_reg) == _scrape(slow_reg)
    assert fast._store_ops["claim",]._slow is None  # the fast path ran, not the fallback
    assert any(line.startswith("idemproxy_claims_in_flight 8.0")
               for line in _scrape(fast_reg))
