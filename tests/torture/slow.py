"""Slow readers (issue 25): clients that ask for a large answer, take its head, then stop
reading for seconds — and sometimes hang up without reading it at all.

Their sockets have a 4 KiB receive buffer and their reader a 4 KiB read buffer, so the
proxy's writes back up within a few windows: a first request whose client stalls must
still be recorded and stored, and a replay must not hold the store while its client is
slow. Their keys (`s1`, `s2`, ...) are their own units; a later slow reader may ask for a
finished one again (a stalled replay), never two at once. Every attempt goes into the
clients' history (phase `slow`) for the checker, and the final phase asks for each unit
again like for any other.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import aiohttp

from tests.torture.clients import (
    ROUTE_WEIGHTS,
    TENANTS,
    Attempt,
    Clients,
    classify,
    record_answer,
    request_body,
)
from tests.torture.upstream import fingerprint

PAD = 6 * 2**20  # bytes of answer: past what the kernel buffers between us hold (4 MiB)
RCVBUF = 4096


def _small_socket(addr_info: Any) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    return sock


class SlowReaders:
    def __init__(self, clients: Clients, *, rng: random.Random) -> None:
        self.clients = clients
        self.rng = rng
        self.done: list[tuple[str, str, str]] = []  # units with no slow reader on them
        self.busy: set[tuple[str, str, str]] = set()
        self.count = 0
        self._session: aiohttp.ClientSession | None = None

    def _unit(self) -> tuple[str, str, str]:
        free = [u for u in self.done if u not in self.busy]
        if free and self.rng.random() < 0.4:
            return self.rng.choice(free)
        self.count += 1
        route = self.rng.choices(list(ROUTE_WEIGHTS), list(ROUTE_WEIGHTS.values()))[0]
        return (self.rng.choice(TENANTS), route, f"s{self.count}")

    async def read(self, url: str, proxy: int, *, stall: float, abandon: bool) -> None:
        """One slow reader on `url` (proxy `proxy`) that stops reading for `stall` seconds,
        then reads the answer or (`abandon`) hangs up; its attempt goes into the history."""
        if self._session is None:
            conn = aiohttp.TCPConnector(force_close=True, socket_factory=_small_socket)
            self._session = aiohttp.ClientSession(connector=conn, auto_decompress=False,
                                                  read_bufsize=RCVBUF)
        unit = self._unit()
        self.busy.add(unit)
        try:
            await self._attempt(self._session, url, proxy, unit, stall=stall,
                                abandon=abandon)
        finally:
            self.busy.discard(unit)
            if unit not in self.done:
                self.done.append(unit)

    async def _attempt(self, session: aiohttp.ClientSession, url: str, proxy: int,
                       unit: tuple[str, str, str], *, stall: float, abandon: bool) -> None:
        tenant, route, key = unit
        body = request_body(key, 1)
        self.clients.ops += 1
        a = Attempt(self.clients.ops, 0, "slow", tenant, route, key, 1,
                    fingerprint("POST", f"/{route}/{key}", body), proxy, time.time())
        headers = {"Authorization": tenant, "Idempotency-Key": key, "X-Torture-Pad": str(PAD),
                   "Content-Type": "application/json"}
        try:
            async with session.post(f"{url}/{route}/{key}", data=body, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=stall + 20)) as r:
                await asyncio.sleep(stall)  # the head is in; the body waits, unread
                if abandon:
                    a.err = "abandoned"  # hung up without reading: nothing was delivered
                    r.close()
                else:
                    record_answer(a, r, await r.read())
        except TimeoutError:
            a.err = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            a.err = type(exc).__name__
        if a.err:
            a.status = None  # an answer cut short was not delivered
        a.t1 = time.time()
        a.kind = classify(a.status, a.replayed)
        self.clients.history.append(a)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
