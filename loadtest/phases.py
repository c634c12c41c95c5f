"""Pure: where a first request's time went, from the proxy's own histograms.

A first request waits for three things in turn: the claim (a round trip and a commit),
the upstream's answer, and the completion (another round trip and commit). The proxy
exports each as a Prometheus histogram (`idemproxy_store_seconds{op}`,
`idemproxy_upstream_seconds`); the harness scrapes /metrics before and after a run, and
the difference says how long each phase took during that run: the mean exactly (sum over
count), percentiles interpolated within the buckets (as Prometheus' histogram_quantile
does), so they are only as fine as the buckets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loadtest.stats import summarize

# (phase, metric family, label that must match) in the order a first request meets them
PHASES = (("claim", "idemproxy_store_seconds", ("op", "claim")),
          ("upstream", "idemproxy_upstream_seconds", None),
          ("complete", "idemproxy_store_seconds", ("op", "complete")))


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts by upper bound, with the sum and count."""

    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), le ascending
    total: float
    count: float

    def minus(self, earlier: Histogram) -> Histogram:
        before = dict(earlier.buckets)
        return Histogram(tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
                         self.total - earlier.total, self.count - earlier.count)

    def quantile(self, q: float) -> float | None:
        """Linear interpolation within the bucket the q-th observation falls in."""
        if self.count <= 0:
            return None
        rank, low, below = q * self.count, 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank:
                if math.isinf(le):
                    return low  # above the last finite bound: say that bound
                inside = cum - below
                return low + (le - low) * ((rank - below) / inside if inside else 1.0)
            low, below = le, cum
        return low


def histograms(text: str) -> dict[str, Histogram]:
    """The PHASES' histograms in a /metrics scrape, summed over any other labels."""
    out: dict[str, Histogram] = {}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for phase, family, want in PHASES:
        fam = families.get(family)
        if fam is None:
            continue
        buckets: dict[float, float] = {}
        total = count = 0.0
        for s in fam.samples:
            if want is not None and s.labels.get(want[0]) != want[1]:
                continue
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
        out[phase] = Histogram(tuple(sorted(buckets.items())), total, count)
    return out


def during(before: str, after: str) -> dict[str, dict[str, float | None]]:
    """Each phase's mean, p50 and p99 in ms between two scrapes (phases seen in both)."""
    a, b = histograms(before), histograms(after)
    out: dict[str, dict[str, float | None]] = {}
    for phase, _, _ in PHASES:
        if phase not in a or phase not in b:
            continue
        h = b[phase].minus(a[phase])
        if h.count <= 0:
            continue
        p50, p99 = h.quantile(0.5), h.quantile(0.99)
        out[phase] = {"n": h.count, "mean_ms": 1000 * h.total / h.count,
                      "p50_ms": None if p50 is None else 1000 * p50,
                      "p99_ms": None if p99 is None else 1000 * p99}
    return out


def summary(runs: list[Mapping[str, Any]]) -> dict[str, float]:
    """Median over rounds of each phase's mean (ms), from the runs' `phases`."""
    out: dict[str, float] = {}
    for phase, _, _ in PHASES:
        means = [r["phases"][phase]["mean_ms"] for r in runs if phase in r.get("phases", {})]
        if means:
            out[phase] = summarize(means).median
    return out
