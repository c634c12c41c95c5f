"""The nemesis: while the clients run, break one thing at a time, then heal everything.

Kinds (pick with `--faults`):

    kill9         SIGKILL one proxy (its process group); restart it 0.5-2.5 s later
    term          SIGTERM one proxy (graceful shutdown); restart it once it has exited
    pg_restart    `pg_ctl restart -m immediate` (crash and recovery; every proxy cut off)
    pg_latency    +0.2-1.2 s per read on one proxy's Postgres link, for 1-4 s
    pg_reset      abort every connection on one proxy's Postgres link
    pg_partition  one proxy's Postgres link goes silent for 1-3 s
    pg_cut        for 3 s, drop the answer to a committed claim / complete / release /
                  COMMIT on one proxy's Postgres link (p=0.5) and cut the connection
    up_latency    +0.3-1.8 s per read on one proxy's upstream link, for 1-4 s
    up_reset      abort every connection on one proxy's upstream link
    up_partition  one proxy's upstream link goes silent for 1-3 s

Clock skew (faketime) is not an event: proxy 1 runs skewed for the whole run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from tests.torture.checker import FaultEvent
from tests.torture.cluster import Cluster, ProxyProc

log = logging.getLogger("torture.nemesis")

ALL_KINDS = ("kill9", "term", "pg_restart", "pg_latency", "pg_reset", "pg_partition",
             "pg_cut", "up_latency", "up_reset", "up_partition")
CUT_KINDS = frozenset({"claim", "complete", "release", "commit"})


class Nemesis:
    def __init__(self, cluster: Cluster, *, seed: int, kinds: tuple[str, ...],
                 interval: tuple[float, float]) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.kinds = kinds
        self.interval = interval
        self.events: list[FaultEvent] = []
        self.counts: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pg_lock = asyncio.Lock()

    async def run(self, *, until: float) -> None:
        await asyncio.sleep(self.rng.uniform(*self.interval) / 2)
        while time.monotonic() < until and self.kinds:
            kind = self.rng.choice(self.kinds)
            try:
                await self.inject(kind)
            except Exception as exc:  # a failed fault is reported, never fatal
                log.warning("fault %s failed: %r", kind, exc)
                self.counts[f"{kind} (failed)"] += 1
            await asyncio.sleep(self.rng.uniform(*self.interval))

    def _record(self, kind: str, proxy: int | None, seconds: float = 0.0) -> None:
        now = time.time()
        self.events.append(FaultEvent(now, kind, proxy, now + seconds))
        self.counts[kind] += 1

    def _later(self, delay: float, action: Callable[[], Awaitable[None] | None]) -> None:
        async def go() -> None:
            await asyncio.sleep(delay)
            result = action()
            if result is not None:
                await result
        task = asyncio.get_running_loop().create_task(go())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def inject(self, kind: str) -> None:
        c, rng = self.cluster, self.rng
        alive = [p for p in c.proxies if p.alive]
        p = rng.choice(c.proxies)
        if kind in ("kill9", "term"):
            if len(alive) < 2:
                return
            p = rng.choice(alive)
            c.kill(p, signal.SIGKILL if kind == "kill9" else signal.SIGTERM)
            down = rng.uniform(0.5, 2.5)
            self._record(kind, p.index, down)
            self._later(down, lambda: self._restart(p))
        elif kind == "pg_restart":
            if self._pg_lock.locked():
                return
            async with self._pg_lock:
                started = time.time()
                assert c.pg is not None
                await asyncio.to_thread(c.pg.restart_immediate)
                self.events.append(FaultEvent(started, kind, None, time.time()))
                self.counts[kind] += 1
        elif kind.endswith("_latency"):
            link = p.pg_link if kind.startswith("pg") else p.up_link
            link.latency = rng.uniform(0.2, 1.2) if kind.startswith("pg") else \
                rng.uniform(0.3, 1.8)
            seconds = rng.uniform(1, 4)
            self._record(kind, p.index, seconds)
            self._later(seconds, lambda: setattr(link, "latency", 0.0))
        elif kind.endswith("_reset"):
            (p.pg_link if kind.startswith("pg") else p.up_link).reset()
            self._record(kind, p.index)
        elif kind.endswith("_partition"):
            link = p.pg_link if kind.startswith("pg") else p.up_link
            link.partitioned = True
            seconds = rng.uniform(1, 3)
            self._record(kind, p.index, seconds)
            self._later(seconds, link.end_partition)
        elif kind == "pg_cut":
            p.pg_link.arm_cut(CUT_KINDS, probability=0.5, seconds=3)
            self._record(kind, p.index, 3)
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _restart(self, p: ProxyProc) -> None:
        await self.cluster.reap(p, timeout=10)
        self.cluster.spawn(p)
        p.restarts += 1

    async def heal(self) -> list[str]:
        """Stop injecting, undo every fault, restart dead proxies; what would not heal."""
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        async with self._pg_lock:
            pass
        problems = []
        for p in self.cluster.proxies:
            p.pg_link.heal()
            p.up_link.heal()
            if not p.alive:
                await self.cluster.reap(p)
                self.cluster.spawn(p)
                p.restarts += 1
        ready = await asyncio.gather(*(self.cluster.wait_ready(p) for p in
                                       self.cluster.proxies))
        for p, reason in zip(self.cluster.proxies, ready, strict=True):
            if reason is not None:
                problems.append(f"proxy {p.index} after healing: {reason} (see {p.log})")
        return problems

    def cuts(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for p in self.cluster.proxies:
            total.update(p.pg_link.stats.cuts)
        return total
