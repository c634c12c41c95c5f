"""CPU-heavy work never starves the event loop or lease renewal (issue #25, item 6).

Stripe-style webhook bodies of a few MB are canonicalised (preset `stripe`) off the event
loop, and a lease is renewed while the loop itself is stalled. Structure is asserted
(which thread ran the work, how many renewals landed), never wall-time thresholds; the
loop lag the probe measures is reported (`-s` prints it).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import asyncpg

from proxy import keys
from tests.test_flow import post

ROUTES = """
- name: stripe
  match: {methods: [POST], path: "/hooks/stripe"}
  preset: stripe
  lock_timeout: 3s
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  lock_timeout: 1s
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  fingerprint: {canonical_json: true}
"""


def stripe_event(size: int) -> bytes:
    """An `invoice.paid` event with enough line items to weigh about `size` bytes."""
    line = {"id": "il_1", "object": "line_item", "amount": 1999, "currency": "usd",
            "description": "1 x Widget (at $19.99 / month)", "discountable": True,
            "metadata": {"order": "A-1001", "sku": "W-1"}, "period": {
                "end": 1767225600, "start": 1764547200}, "quantity": 1, "price": 19.99}
    n = max(1, size // len(json.dumps(line)))
    event = {"id": f"evt_{uuid.uuid4().hex}", "object": "event", "type": "invoice.paid",
             "pending_webhooks": 1, "data": {"object": {
                 "id": "in_1", "object": "invoice", "lines": {
                     "object": "list", "data": [dict(line, id=f"il_{i}") for i in range(n)]}}}}
    return json.dumps(event).encode()


class LagProbe:
    """How late the event loop runs a 5 ms timer: the longest delay seen while on."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.005)
            self.worst = max(self.worst, loop.time() - start - 0.005)

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_big_webhook_bodies_are_canonicalised_off_the_event_loop(
        make_proxy, upstream, client, monkeypatch):
    """Three ~1 MB Stripe events at once: their key and canonical fingerprint are computed
    on worker threads, never on the loop's thread; each executes once and replays."""
    where: list[str] = []
    for name in ("read_key", "fingerprint"):
        real = getattr(keys, name)

        def spy(*args, __real=real, __name=name, **kwargs):
            on_loop = threading.current_thread() is threading.main_thread()
            where.append(f"{__name}:{'loop' if on_loop else 'thread'}")
            return __real(*args, **kwargs)

        monkeypatch.setattr(keys, name, spy)
    p = await make_proxy(ROUTES)
    bodies = [stripe_event(1_000_000) for _ in range(3)]
    anonymous = {"Authorization": ""}  # webhooks carry no credential (tenant: none)
    async with LagProbe() as probe:
        first = await asyncio.gather(*[post(client, p.url + "/hooks/stripe", data=b,
                                            headers=anonymous) for b in bodies])
    print(f"\nloop lag, 3 x {len(bodies[0]) / 1e6:.1f} MB stripe events at once: "
          f"worst {probe.worst * 1000:.1f} ms")
    assert [s for s, _, _ in first] == [200] * 3
    assert sorted(set(where)) == ["fingerprint:thread", "read_key:thread"]
    assert p.deps.cpu.offloaded == 6
    again = await post(client, p.url + "/hooks/stripe", data=bodies[0], headers=anonymous)
    assert again[1]["Idempotent-Replayed"] == "true" and upstream.count("/hooks") == 3


async def test_small_bodies_stay_on_the_loop(make_proxy, upstream, client):
    """A small body's key and fingerprint are computed inline: no thread hop."""
    p = await make_proxy(ROUTES)
    s, _, _ = await post(client, p.url + "/exec/small", key=uuid.uuid4().hex,
                         data=b'{"a": 1}')
    assert s == 201 and p.deps.cpu.offloaded == 0


async def test_a_lease_is_renewed_while_the_event_loop_is_stalled(
        make_proxy, upstream, client, db):
    """A request in flight (lease 1 s) while the loop is blocked for 2.5 s: renewals keep
    landing from the lease thread (the heartbeat moves on several times), so the lease
    never ends; the request then completes once."""
    p = await make_proxy(ROUTES, upstream_timeout="30s")
    key = uuid.uuid4().hex
    first = asyncio.create_task(post(client, p.url + "/gate/stall", key=key))
    async with asyncio.timeout(10):
        while upstream.count("/gate/stall") < 1:
            await asyncio.sleep(0.02)
    conn = await asyncpg.connect(db)
    try:
        query = "SELECT heartbeat FROM idemproxy_keys WHERE key = $1"
        before = await conn.fetchval(query, key)
        time.sleep(2.5)  # noqa: ASYNC251 - the stall under test: nothing on the loop runs
        after = await conn.fetchval(query, key)
        alive = await conn.fetchval(
            "SELECT locked_until > now() FROM idemproxy_keys WHERE key = $1", key)
    finally:
        await conn.close()
    assert after - before >= 3 and alive, (before, after)
    upstream.gate.set()
    assert (await first)[0] == 201 and upstream.count("/gate/stall") == 1
