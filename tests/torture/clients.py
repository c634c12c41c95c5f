"""Client workers that behave like payment SDKs and write down everything they see.

Keys come from small per-route pools shared by two tenants, so sequential and concurrent
duplicates are frequent; now and then a key is retired and a fresh one drawn, and a few
requests reuse a key with a changed body. Each logical operation retries like Stripe's or
AWS's SDKs: on timeouts (1 s), connection errors, 409 and 5xx, with capped exponential
backoff and jitter, honouring Retry-After; it stops at the first definite answer.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field

import aiohttp

from tests.torture.upstream import EXEC_HEADER, fingerprint, summarize

TENANTS = ("Bearer tenant-a", "Bearer tenant-b")
ROUTE_WEIGHTS = {"pay": 6, "wait": 3, "fail": 2}
PROBLEM_BASE = "https://idemproxy.dev/errors/"


@dataclass
class Attempt:
    """One HTTP exchange, as the client saw it."""

    op: int
    n: int
    phase: str
    tenant: str
    route: str
    key: str
    version: int
    fp: str
    proxy: int
    t0: float
    t1: float = 0.0
    kind: str = ""  # ok | def | indet
    status: int | None = None
    ptype: str = ""  # problem type slug, if any
    replayed: bool = False
    body: str = ""  # upstream.summarize(): a large body as its exec id, length and hash
    err: str = ""
    exec: str = ""  # the X-Torture-Exec header (a 204 has no body to carry its exec id)
    omitted: bool = False  # replayed with `Idempotency-Body: omitted` (no body stored)

    @property
    def unit(self) -> tuple[str, str, str]:
        return (self.tenant, self.route, self.key)

    def line(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def request_body(key: str, version: int) -> bytes:
    amount = 100 + sum(key.encode()) % 900 + (version - 1)
    return json.dumps({"key": key, "amount": amount, "version": version}).encode()


@dataclass
class KeyPools:
    rng: random.Random
    size: int = 8
    retire: float = 0.1
    pools: dict[str, list[str]] = field(default_factory=dict)
    counter: int = 0
    recent: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for route in ROUTE_WEIGHTS:
            self.pools[route] = [self._fresh(route) for _ in range(self.size)]

    def _fresh(self, route: str) -> str:
        if self.recent and self.rng.random() < 0.15:  # same key name on another route
            return self.rng.choice(self.recent[-20:])
        self.counter += 1
        name = f"k{self.counter}"
        self.recent.append(name)
        return name

    def pick(self) -> tuple[str, str]:
        route = self.rng.choices(list(ROUTE_WEIGHTS), weights=list(ROUTE_WEIGHTS.values()))[0]
        pool = self.pools[route]
        i = self.rng.randrange(len(pool))
        key = pool[i]
        if self.rng.random() < self.retire:
            pool[i] = self._fresh(route)
        return route, key


class Clients:
    def __init__(self, urls: list[str], *, seed: int, timeout: float = 1.0,
                 max_attempts: int = 8, changed_body: float = 0.05) -> None:
        self.urls = urls
        self.rng = random.Random(seed)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.changed_body = changed_body
        self.pools = KeyPools(random.Random(seed + 1))
        self.history: list[Attempt] = []
        self.ops = 0

    async def run(self, *, workers: int, until: float) -> None:
        conn = aiohttp.TCPConnector(limit=workers * 2, force_close=False)
        async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
            await asyncio.gather(*(self._worker(session, w, until) for w in range(workers)))

    async def _worker(self, session: aiohttp.ClientSession, w: int, until: float) -> None:
        rng = random.Random(self.rng.random())
        while time.monotonic() < until:
            route, key = self.pools.pick()
            tenant = rng.choice(TENANTS)
            version = 2 if rng.random() < self.changed_body else 1
            await self.operation(session, rng, tenant=tenant, route=route, key=key,
                                 version=version, phase="run", deadline=until + 10)
            await asyncio.sleep(rng.uniform(0, 0.02))

    async def operation(self, session: aiohttp.ClientSession, rng: random.Random, *,
                        tenant: str, route: str, key: str, version: int, phase: str,
                        deadline: float, max_attempts: int | None = None) -> Attempt | None:
        """Retry until a definite answer; the last attempt."""
        self.ops += 1
        op = self.ops
        body = request_body(key, version)
        fp = fingerprint("POST", f"/{route}/{key}", body)
        last = None
        for n in range(max_attempts or self.max_attempts):
            if time.monotonic() > deadline:
                break
            proxy = rng.randrange(len(self.urls))
            a = Attempt(op, n, phase, tenant, route, key, version, fp, proxy, time.time())
            retry_after = await self._send(session, a, body)
            self.history.append(a)
            last = a
            if a.kind != "indet":
                return a
            pause = min(1.0, 0.05 * 2 ** n) * rng.uniform(0.5, 1.5)
            await asyncio.sleep(max(pause, min(retry_after, 1.0)))
        return last

    async def _send(self, session: aiohttp.ClientSession, a: Attempt, body: bytes) -> float:
        headers = {"Authorization": a.tenant, "Idempotency-Key": a.key,
                   "Content-Type": "application/json"}
        url = f"{self.urls[a.proxy]}/{a.route}/{a.key}"
        retry_after = 0.0
        try:
            async with session.post(url, data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                raw = await r.read()
                retry_after = record_answer(a, r, raw)
        except TimeoutError:
            a.err = "timeout"
        except aiohttp.ClientConnectorError:
            a.err = "refused"
        except (aiohttp.ClientError, OSError) as exc:
            a.err = type(exc).__name__
        a.t1 = time.time()
        a.kind = classify(a.status, a.replayed)
        return retry_after


def record_answer(a: Attempt, r: aiohttp.ClientResponse, raw: bytes) -> float:
    """Write down what the answer was; the Retry-After of a 409 (else 0)."""
    a.status = r.status
    a.replayed = r.headers.get("Idempotent-Replayed") == "true"
    a.body = summarize(raw)
    a.exec = r.headers.get(EXEC_HEADER, "")
    a.omitted = r.headers.get("Idempotency-Body") == "omitted"
    if r.headers.get("Content-Type", "").startswith("application/problem+json"):
        a.ptype = _problem_type(raw)
    if r.status == 409:
        return float(r.headers.get("Retry-After", "1") or 1)
    return 0.0


def classify(status: int | None, replayed: bool) -> str:
    """ok: a 2xx; def: 422, any other 4xx but 409, or a replayed (stored) failure."""
    if status is None:
        return "indet"
    if 200 <= status < 300:
        return "ok"
    if replayed or (400 <= status < 500 and status != 409):
        return "def"
    return "indet"


def _problem_type(raw: bytes) -> str:
    try:
        t = json.loads(raw).get("type", "")
    except (ValueError, AttributeError):
        return "?"
    return str(t).removeprefix(PROBLEM_BASE)
