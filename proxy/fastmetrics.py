"""Per-request metric updates without prometheus_client's per-call overhead, with the
library's public methods as the fallback when its internals differ. Duck-typed: this
module does not import prometheus_client (proxy/metrics.py owns it), and
tests/test_metrics.py checks a scrape shows what the library's own calls would."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any


def inc_of(metric: Any) -> Callable[[float], None]:
    """`metric.inc` without prometheus_client's per-call checks (is it a labelled parent?
    is the amount negative?): its value's own inc, which takes the value's lock (or, in
    multiprocess mode, writes the shared file) as `inc` would. Our callers pass children
    and non-negative amounts only (a gauge's -1 is its dec). The public method if the
    library's internals ever differ."""
    inc = getattr(getattr(metric, "_value", None), "inc", None)
    chosen: Callable[[float], None] = inc if callable(inc) else metric.inc
    return chosen


class Observe:
    """`histogram_child.observe` without its per-call checks and its Python loop over the
    buckets: a bisect finds the first bucket whose bound is at or above the value (as the
    loop does), and the bucket's and the sum's values are incremented as it does."""

    __slots__ = ("_bounds", "_buckets", "_sum", "_slow")

    def __init__(self, child: Any) -> None:
        self._bounds: list[float] = list(getattr(child, "_upper_bounds", ()))
        self._buckets: list[Any] = list(getattr(child, "_buckets", ()))
        total = getattr(child, "_sum", None)
        fast = (self._bounds and len(self._bounds) == len(self._buckets)
                and self._bounds[-1] == float("inf") and total is not None
                and all(callable(getattr(b, "inc", None)) for b in (*self._buckets, total)))
        self._sum: Any = total
        self._slow: Callable[[float], None] | None = None if fast else child.observe

    def __call__(self, amount: float) -> None:
        if self._slow is not None:
            self._slow(amount)
            return
        self._sum.inc(amount)
        self._buckets[bisect_left(self._bounds, amount)].inc(1)


class Children(dict[tuple[str, ...], Any]):
    """A metric's children by label values, kept (labels() builds and hashes a key on
    every call, and these run on every request; the children never change), as what
    `wrap` makes of each: its increment or its observation."""

    def __init__(self, metric: Any, wrap: Callable[[Any], Any]) -> None:
        super().__init__()
        self._metric = metric
        self._wrap = wrap

    def __missing__(self, labels: tuple[str, ...]) -> Any:
        child = self[labels] = self._wrap(self._metric.labels(*labels))
        return child
