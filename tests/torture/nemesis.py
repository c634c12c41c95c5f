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

What found issue 25's problems:

    stall         SIGSTOP one proxy's process group for 0.3-3 s, then SIGCONT (a CPU stall
                  or a VM pause: its timers, lease renewal included, fire late)
    db_clock      step the database host's wall clock by ±3-120 s for 1-5 s, then back
                  (libfaketime on Postgres; an NTP step or a VM resume in production)
    up_malformed  for 1-4 s, half of one proxy's executions answer malformed: a control
                  byte in the reason phrase, a bad chunk after a valid head, 204 without
                  Content-Length (tests/torture/upstream.py)
    slow_reader   1-3 clients on one proxy ask for a 6 MiB answer and stop reading it
                  for 1-6 s (some then hang up): tests/torture/slow.py

Every fault is a FaultEvent in the history (its `detail`: the clock step, the readers).
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

import aiohttp

from tests.torture.checker import FaultEvent
from tests.torture.clients import Clients
from tests.torture.cluster import Cluster, ProxyProc
from tests.torture.slow import SlowReaders

log = logging.getLogger("torture.nemesis")

ALL_KINDS = ("kill9", "term", "pg_restart", "pg_latency", "pg_reset", "pg_partition",
             "pg_cut", "up_latency", "up_reset", "up_partition", "stall", "db_clock",
             "up_malformed", "slow_reader")
CUT_KINDS = frozenset({"claim", "complete", "release", "commit"})


class Nemesis:
    def __init__(self, cluster: Cluster, *, seed: int, kinds: tuple[str, ...],
                 interval: tuple[float, float], clients: Clients | None = None) -> None:
        self.cluster = cluster
        self.rng = random.Random(seed)
        self.kinds = kinds
        self.interval = interval
        self.events: list[FaultEvent] = []
        self.counts: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._readers: set[asyncio.Task[None]] = set()  # awaited, never cancelled, at heal
        self._pg_lock = asyncio.Lock()
        self._clock_until = 0.0
        self.slow = SlowReaders(clients, rng=random.Random(seed + 1)) if clients else None

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

    def _record(self, kind: str, proxy: int | None, seconds: float = 0.0,
                detail: str = "") -> None:
        now = time.time()
        self.events.append(FaultEvent(now, kind, proxy, now + seconds, detail))
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
        alive = [p for p in c.proxies if p.alive and not p.paused]
        p = rng.choice(c.proxies)
        if kind in ("stall", "db_clock", "up_malformed", "slow_reader"):
            await self._inject_25(kind, alive)
        elif kind in ("kill9", "term"):
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

    async def _inject_25(self, kind: str, alive: list[ProxyProc]) -> None:
        """The faults that found issue 25's problems."""
        c, rng = self.cluster, self.rng
        if kind == "stall":
            if len(alive) < 2:
                return
            p, seconds = rng.choice(alive), rng.uniform(0.3, 3.0)
            c.pause(p)
            self._record(kind, p.index, seconds)
            self._later(seconds, lambda: c.resume(p))
        elif kind == "db_clock":
            assert c.pg is not None
            if c.pg.clock_file is None:
                raise RuntimeError("the database runs without libfaketime")
            if time.monotonic() < self._clock_until:
                return  # one step at a time: each goes back to the real clock
            step = rng.choice((-1, 1)) * rng.uniform(3, 120)
            seconds = rng.uniform(1, 5)
            self._clock_until = time.monotonic() + seconds
            c.pg.step_clock(step)
            self._record(kind, None, seconds, f"{step:+.0f}s")
            self._later(seconds, lambda: c.pg.step_clock(0) if c.pg else None)
        elif kind == "up_malformed":
            p, seconds = rng.choice(c.proxies), rng.uniform(1, 4)
            await self._arm_malformed(p.index, probability=0.5, seconds=seconds)
            self._record(kind, p.index, seconds)
        elif kind == "slow_reader":
            if self.slow is None or not alive:
                return
            p, n = rng.choice(alive), rng.randint(1, 3)
            stall = rng.uniform(1, 6)
            for _ in range(n):
                task = asyncio.get_running_loop().create_task(self.slow.read(
                    p.url, p.index, stall=stall, abandon=rng.random() < 0.3))
                self._readers.add(task)
                task.add_done_callback(self._readers.discard)
            self._record(kind, p.index, stall, f"{n} readers")
        else:
            raise ValueError(f"unknown fault kind {kind!r}")

    async def _arm_malformed(self, proxy: int, *, probability: float, seconds: float) -> None:
        url = f"http://127.0.0.1:{self.cluster.upstream_port}/_nemesis/malformed"
        async with aiohttp.ClientSession() as s, s.post(url, params={
                "proxy": f"p{proxy}", "p": str(probability), "seconds": str(seconds)},
                timeout=aiohttp.ClientTimeout(total=5)) as r:
            r.raise_for_status()

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
        c = self.cluster
        if c.pg is not None and c.pg.clock_file is not None:
            c.pg.step_clock(0)
        for p in c.proxies:
            c.resume(p)
        # Slow readers end on their own (bounded): their attempts belong in the history.
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.slow is not None:
            await self.slow.close()
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
