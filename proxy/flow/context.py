"""What one guarded request carries through the flow: its dependencies and identity,
and how its end is counted and logged."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from proxy import logs
from proxy.config import Concurrent, Route
from proxy.flow.cache import ReplayCache
from proxy.flow.leases import Leases
from proxy.flow.offload import Offload
from proxy.keys.tenant import Verify
from proxy.lifecycle import Lifecycle
from proxy.metrics import Metrics
from proxy.observe import Fanout, Observer, Outcome, Verdict
from proxy.sealing import Sealer
from proxy.store import Store
from proxy.store.notify import Notifier
from proxy.store.sightings import Sightings
from proxy.upstream.choice import Upstreams
from proxy.upstream.forward import Forwarder

log = logging.getLogger("idemproxy.request")
request_log = logs.RequestLog(log)


def default_observer(metrics: Metrics) -> Observer:
    """What watches a process by default: its metrics and the request log."""
    return Fanout((metrics, logs.RequestLogObserver(request_log)))


@dataclass(kw_only=True)
class Services:
    """What the admin API needs: the store, the metrics, the replay cache to keep honest."""

    store: Store
    metrics: Metrics
    cache: ReplayCache | None = None  # completed small responses (proxy/flow/cache.py)
    life: Lifecycle = field(default_factory=Lifecycle)  # requests in flight, the drain
    # what the flow reports to (proxy/observe.py); default: the metrics and the request log
    observer: Observer = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.observer is None:
            self.observer = default_observer(self.metrics)


@dataclass(kw_only=True)
class Deps(Services):
    """What the flow needs besides: assembled once, by app.create_app."""

    forwarder: Forwarder
    # seals pieces and keys hashes (proxy/sealing.py): loaded by the runtime, handed in
    sealer: Sealer = None  # type: ignore[assignment]
    notifier: Notifier | None = None
    db_clock_offset: float = 0.0  # database clock minus local clock, for key buckets
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    upstreams: Upstreams | None = None  # routes' own upstreams (None: all go to forwarder)
    # verifies a route's tenant JWT (Identities.principal); None: no route needs one
    verify: Verify | None = None
    leases: Leases = field(init=False)  # renews the leases of claims executing here
    # other owners' claims seen in flight: a takeover's evidence (proxy/store/sightings.py)
    sightings: Sightings = field(default_factory=Sightings)
    cpu: Offload = field(default_factory=Offload)  # big bodies' key and fingerprint work

    def __post_init__(self) -> None:
        super().__post_init__()
        self.leases = Leases(self.store)
        self.life.background = self.tasks.__len__

    def forwarder_for(self, route: Route) -> Forwarder:
        return self.forwarder if self.upstreams is None else self.upstreams.for_route(route)

    def forwarder_for_path(self, raw_path: str) -> Forwarder:
        return self.forwarder if self.upstreams is None else \
            self.upstreams.for_path(raw_path)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run an owned background task (kept referenced; cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class _LockTokens:
    """Lock tokens: unique per claim, across processes and restarts; never secret (they go
    to the database only). uuid4() reads the OS's random source for every token, 2.4 % of
    a first request's CPU samples; here each process draws 60 random bits once (again in
    a forked child) and counts. Tokens are valid version-4 UUIDs."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        high = int.from_bytes(os.urandom(8)) & ~(0xF << 12) | (4 << 12)  # version 4
        self._high = high << 64 | 1 << 63  # RFC 4122 variant in the low half
        self._count = itertools.count()

    def __call__(self) -> uuid.UUID:
        return uuid.UUID(int=self._high | next(self._count))


new_token = _LockTokens()


@dataclass(slots=True)
class Guarded:
    """One guarded request's identity."""

    route: Route
    scope: str
    key: str
    fingerprint: bytes  # as stored: keyed under the primary key (proxy/sealing.py)
    body: bytes
    key_hash: str = ""  # the key's name in log lines (a keyed hash)
    digest: bytes = b""  # the request's plain SHA-256, to key it as an older record did
    token: uuid.UUID = field(default_factory=new_token)
    started: float = field(default_factory=time.perf_counter)

    @property
    def notify(self) -> bool:
        """Only routes that hold retries (concurrent: wait) have waiters to wake."""
        return self.route.concurrent is Concurrent.WAIT


def finish(deps: Deps, g: Guarded | None, route: Route, outcome: Outcome, status: int) -> None:
    """A request is done: its verdict goes to the observers (counted, logged)."""
    if g is None:
        deps.observer.request_done(Verdict(route.name, outcome, status))
    else:
        deps.observer.request_done(Verdict(
            route.name, outcome, status, True, g.key_hash, g.scope.split(":", 1)[1],
            g.started))
