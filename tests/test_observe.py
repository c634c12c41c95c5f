"""The observer seam (proxy/observe.py): a fan-out calls each observer in order and skips
those that ignore an event; the flow and the store report what happened to whatever
observer the proxy was built with, so tracing can be one more without touching the flow."""

from __future__ import annotations

import time
import uuid
from typing import Any

import aiohttp

from proxy.flow.context import default_observer
from proxy.metrics import CollectorRegistry, Metrics
from proxy.observe import EVENTS, BaseObserver, Fanout, Observer, Outcome, Verdict
from proxy.store.postgres import PostgresStore


class Recorder(BaseObserver):
    """Keeps every event it is given, as (event, args)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def of(self, event: str) -> list[tuple[Any, ...]]:
        return [args for name, args in self.events if name == event]


def _recording(event: str) -> Any:
    def method(self: Recorder, *args: Any) -> None:
        self.events.append((event, args))
    return method


for _event in EVENTS:  # a method of its own per event, as an observer defines them
    setattr(Recorder, _event, _recording(_event))


class OnlyTakeovers(BaseObserver):
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def takeover(self, route: str) -> None:
        self.seen.append(f"takeover {route}")


class OnlyTakeoversToo(OnlyTakeovers):
    def takeover(self, route: str) -> None:
        self.seen.append(f"second {route}")


def test_the_base_observer_handles_every_event_of_the_protocol():
    """BaseObserver, Fanout and Metrics implement every event the Observer protocol names."""
    protocol = {n for n in vars(Observer) if not n.startswith("_")}
    assert set(EVENTS) == protocol
    for cls in (Fanout, Metrics):
        assert all(callable(getattr(cls, e)) for e in EVENTS), cls


def test_fanout_calls_each_observer_in_order_and_skips_those_that_ignore_an_event():
    """Each event reaches every observer that handles it, in the order given; an observer
    that left an event to BaseObserver is not called for it."""
    seen: list[str] = []
    fan = Fanout([OnlyTakeovers(seen), BaseObserver(), OnlyTakeoversToo(seen)])
    fan.takeover("charges")
    fan.record_lost("charges")  # nobody handles it: nothing happens, nothing raises
    assert seen == ["takeover charges", "second charges"]
    three: list[str] = []
    Fanout([OnlyTakeovers(three)] * 3).takeover("r")
    assert three == ["takeover r"] * 3


def test_a_fanout_inside_a_fanout_still_reaches_its_observers():
    """A Fanout given to another (the default observer plus tracing) passes each event
    on: its handlers are instance attributes, not left to BaseObserver."""
    seen: list[str] = []
    outer = Fanout([Fanout([OnlyTakeovers(seen), OnlyTakeoversToo(seen)]),
                    OnlyTakeovers(seen)])
    outer.takeover("r")
    assert seen == ["takeover r", "second r", "takeover r"]


def test_the_default_observer_counts_and_logs_a_verdict():
    """default_observer(metrics) counts each request by route and outcome."""
    metrics = Metrics(CollectorRegistry())
    observer = default_observer(metrics)
    observer.request_done(Verdict("charges", Outcome.REPLAYED, 201))
    assert metrics.registry.get_sample_value(
        "idemproxy_requests_total", {"route": "charges", "outcome": "replayed"}) == 1


async def test_a_guarded_request_reports_its_verdict_and_its_upstream_span(
        make_proxy, client: aiohttp.ClientSession):
    """A first request and its replay each report one verdict (route, outcome, status,
    key hash, tenant); the first also reports its upstream span and that it executed."""
    p = await make_proxy()
    rec = Recorder()
    p.deps.observer = Fanout([p.deps.observer, rec])
    key = uuid.uuid4().hex
    for _ in range(2):
        async with client.post(p.url + "/any/obs", data=b"{}",
                               headers={"Idempotency-Key": key}) as resp:
            assert resp.status == 200
            await resp.read()
    verdicts = [v for (v,) in rec.of("request_done")]
    assert [(v.route, v.outcome, v.status, v.guarded) for v in verdicts] == [
        ("any", Outcome.FORWARDED, 200, True), ("any", Outcome.REPLAYED, 200, True)]
    assert all(v.key_hash and v.tenant and v.started > 0 for v in verdicts)
    [(route, start, end)] = rec.of("upstream_timed")
    assert route == "any" and start <= end <= time.perf_counter()
    assert rec.of("executing") == [(1,), (-1,)]


async def test_the_store_reports_each_call_with_its_start_and_end(db: str):
    """Each store round trip is reported as (op, start, end) in perf_counter seconds."""
    spans: list[tuple[str, float, float]] = []
    store = await PostgresStore.connect(db, min_size=1, max_size=2,
                                        observe=lambda *span: spans.append(span))
    try:
        before = time.perf_counter()
        await store.claim(scope="obs:t", key=uuid.uuid4().hex, fingerprint=b"\x01" * 32,
                          token=uuid.uuid4(), lease=30, ttl=60)
        after = time.perf_counter()
    finally:
        await store.close()
    [(op, start, end)] = [s for s in spans if s[0] == "claim"]
    assert before <= start <= end <= after
