"""The harness's own HTTP client work: pre-filling replay keys, the 100 MiB exchange,
and reading the proxy's outcome counters."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from dataclasses import dataclass

import aiohttp

from loadtest.configs import AUTHORIZATION, BODY
from loadtest.procs import reset_peak_rss, rss_kib, tree

POST_HEADERS = {"Authorization": AUTHORIZATION, "Content-Type": "application/json"}


async def _prefill(base: str, count: int, concurrency: int) -> int:
    sem = asyncio.Semaphore(concurrency)
    created = 0
    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            nonlocal created
            async with sem, session.post(f"{base}/v1/charges", data=BODY, headers={
                    **POST_HEADERS, "Idempotency-Key": f"replay-{i}"}) as resp:
                await resp.read()
                created += resp.status == 201
        await asyncio.gather(*(one(i) for i in range(1, count + 1)))
    return created


def prefill(base: str, count: int, *, concurrency: int = 32) -> int:
    """Store `count` completed keys replay-1..replay-N; returns how many answered 201."""
    return asyncio.run(_prefill(base, count, concurrency))


@dataclass(frozen=True, slots=True)
class BigPass:
    """One 100 MiB exchange: bytes the client got, time, and the server's RSS growth."""

    received: int
    seconds: float
    replayed: bool
    rss_growth_mib: float
    peak_source: str  # "VmHWM" (kernel peak, reset before) or "sampled" (VmRSS every 5 ms)

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


def _total(pids: list[int], field: str = "VmRSS") -> int:
    return sum(rss_kib(p, field) for p in pids)


class _Sampler(threading.Thread):
    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self._done = pids, _total(pids), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, _total(self.pids))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


async def _exchange(url: str, key: str | None) -> tuple[int, bool]:
    headers = dict(POST_HEADERS)
    if key:
        headers["Idempotency-Key"] = key
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.post(url, data=b"{}", headers=headers) as resp:
        got = 0
        async for chunk in resp.content.iter_chunked(1 << 20):
            got += len(chunk)
        return got, resp.headers.get("Idempotent-Replayed") == "true"


def big_pass(*, pid: int, url: str, key: str | None) -> BigPass:
    """One exchange through the server `pid`, measuring its peak RSS above the start.

    With workers, the RSS is the sum over the supervisor and its workers (the peaks are
    summed too, which can only overstate the growth).
    """
    pids = tree(pid)
    kernel_peak = all([reset_peak_rss(p) for p in pids])
    base = _total(pids)
    sampler = _Sampler(pids)
    sampler.start()
    start = time.perf_counter()
    try:
        got, replayed = asyncio.run(_exchange(url, key))
    finally:
        sampled = sampler.stop()
    seconds = time.perf_counter() - start
    peak = max(sampled, _total(pids, "VmHWM")) if kernel_peak else sampled
    return BigPass(got, seconds, replayed, (peak - base) / 1024,
                   "VmHWM" if kernel_peak else "sampled")


_COUNTER = re.compile(r"^idemproxy_requests_total\{([^}]*)\} (\S+)$", re.M)
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def parse_outcomes(metrics_text: str) -> dict[str, int]:
    """`route/outcome` → count, from the proxy's Prometheus text (labels in any order)."""
    out = {}
    for labels, n in _COUNTER.findall(metrics_text):
        d = dict(_LABEL.findall(labels))
        out[f"{d.get('route', '')}/{d.get('outcome', '')}"] = int(float(n))
    return out


def metrics_text(admin: str) -> str:
    """The proxy's /metrics (Prometheus text), from its admin URL."""
    with urllib.request.urlopen(f"{admin}/metrics", timeout=10) as resp:  # noqa: S310
        text: str = resp.read().decode()
        return text


def outcomes(admin: str) -> dict[str, int]:
    return parse_outcomes(metrics_text(admin))
