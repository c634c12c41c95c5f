"""The process's one lease timer (context.Leases) against real PostgreSQL: a claim held
while it executes keeps its key; one dropped (or never held) loses it when its lease
ends, so a dead or frozen owner's key can be taken over."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from proxy.config import loads
from proxy.flow.context import Guarded, Leases
from proxy.store import Beat, ClaimOutcome
from proxy.store.postgres import PostgresStore


@pytest.fixture
def db(layout_db: str) -> str:
    """This module's tests run on one node and on a Citus cluster (issue #29)."""
    return layout_db


def _guarded(lease: str) -> Guarded:
    cfg = loads(f"routes:\n  - {{name: lease, match: {{path: /l}}, lock_timeout: {lease}, "
                "ttl: 60s}\n", env={})
    return Guarded(cfg.routes[0], f"lease:{uuid.uuid4().hex}", uuid.uuid4().hex, b"f" * 32,
                   b"")


async def _claim(store: PostgresStore, g: Guarded, token: uuid.UUID | None = None, *,
                 seen: Beat | None = None) -> ClaimOutcome:
    c = await store.claim(scope=g.scope, key=g.key, fingerprint=g.fingerprint,
                          token=token or uuid.uuid4(), lease=g.route.lock_timeout, ttl=60,
                          seen=seen)
    return c.outcome


async def _beat(store: PostgresStore, g: Guarded) -> Beat:
    """The claim's (token, heartbeat) as another proxy sees it now."""
    c = await store.claim(scope=g.scope, key=g.key, fingerprint=g.fingerprint,
                          token=uuid.uuid4(), lease=g.route.lock_timeout, ttl=60)
    assert c.outcome is ClaimOutcome.EXISTING
    return c.record.beat


async def test_a_held_claim_outlives_its_lease_and_a_dropped_one_does_not(
        store: PostgresStore):
    """Held past twice its lease, the claim still holds the key (renewed, its heartbeat
    moved on); once dropped, its lease ends and a claim showing the heartbeat it saw
    takes the key over."""
    leases = Leases(store)
    g = _guarded("500ms")
    assert await _claim(store, g, g.token) is ClaimOutcome.NEW
    first = await _beat(store, g)
    leases.hold(g)
    try:
        await asyncio.sleep(1.2)
        assert await _claim(store, g, seen=first) is ClaimOutcome.EXISTING
    finally:
        leases.drop(g)
    assert len(leases) == 0
    last = await _beat(store, g)
    assert last.heartbeat > first.heartbeat
    # A renewal already on its way on the lease thread when the claim was dropped may
    # still land: the claim is taken over with the heartbeat it settled on.
    for _ in range(10):
        await asyncio.sleep(0.8)
        now = await _beat(store, g)
        if now == last:
            break
        last = now
    assert await _claim(store, g, seen=last) is ClaimOutcome.TAKEN_OVER


async def test_claims_of_different_leases_are_each_renewed_in_time(store: PostgresStore):
    """A short lease held next to a long one (the timer armed for the long one first) is
    renewed before it ends; a claim never held is taken over meanwhile."""
    leases = Leases(store)
    long, short, idle = _guarded("30s"), _guarded("500ms"), _guarded("500ms")
    for g in (long, short, idle):
        assert await _claim(store, g, g.token) is ClaimOutcome.NEW
    seen = {g.key: await _beat(store, g) for g in (short, idle)}
    leases.hold(long)
    leases.hold(short)
    try:
        await asyncio.sleep(1.2)
        assert await _claim(store, short, seen=seen[short.key]) is ClaimOutcome.EXISTING
        assert await _claim(store, long) is ClaimOutcome.EXISTING
        assert await _claim(store, idle, seen=seen[idle.key]) is ClaimOutcome.TAKEN_OVER
    finally:
        leases.drop(short)
        leases.drop(long)


async def test_a_claim_taken_over_is_not_renewed_again(store: PostgresStore):
    """A held claim whose key another owner took is not extended for the new owner's
    token: the renewal is a compare-and-set on the held claim's own token."""
    leases = Leases(store)
    g = _guarded("500ms")
    assert await _claim(store, g, g.token) is ClaimOutcome.NEW
    seen = await _beat(store, g)
    await asyncio.sleep(0.6)  # ended before it was held: another owner takes it
    other = uuid.uuid4()
    assert await _claim(store, g, other, seen=seen) is ClaimOutcome.TAKEN_OVER
    leases.hold(g)
    try:
        await asyncio.sleep(0.8)
    finally:
        leases.drop(g)
    assert not await store.extend(scope=g.scope, key=g.key, token=g.token, lease=1)
    assert await store.extend(scope=g.scope, key=g.key, token=other, lease=1)
