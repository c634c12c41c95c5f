"""A step of the database's clock alone never ends a live lease (issue #25, item 7).

The database runs under libfaketime (tests/faketime_pg.py) and the test steps its wall
clock during a flight, as an NTP step or a VM resumed on the database host would. Two
in-process proxies share it, with real sockets; the upstream holds the first request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.store import ClaimOutcome, Completion
from proxy.store.migrate import migrate
from proxy.store.postgres import PostgresStore
from proxy.store.sightings import Sightings
from proxy.store.sweeper import sweep_once
from tests.faketime_pg import FaketimePostgres
from tests.test_flow import post

LEASE = 3.0
ROUTES = f"""
- name: gate
  match: {{methods: [POST], path: "/gate/*"}}
  lock_timeout: {LEASE:g}s
  ttl: 24h
"""


@pytest.fixture(scope="module")
async def faketime_pg() -> AsyncIterator[FaketimePostgres]:
    pg = await asyncio.to_thread(FaketimePostgres)
    try:
        conn = await asyncpg.connect(pg.url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield pg
    finally:
        await asyncio.to_thread(pg.cleanup)


@pytest.fixture
async def db(faketime_pg: FaketimePostgres) -> AsyncIterator[str]:
    """The suite's `db`, here the database whose clock the test steps (back to true
    after each test)."""
    faketime_pg.step(0)
    yield faketime_pg.url
    faketime_pg.step(0)


def new_key() -> str:
    return uuid.uuid4().hex


async def _flying(client, upstream, url: str, key: str) -> asyncio.Task:
    """The first request, held by the upstream once it executed."""
    first = asyncio.create_task(post(client, url, key=key))
    async with asyncio.timeout(10):
        while upstream.count("/gate/") < 1:
            await asyncio.sleep(0.02)
    return first


async def _retries_conflict(client, url: str, key: str, *, seconds: float) -> None:
    """Retry for `seconds` (more than two leases): each one a 409, never an execution."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        status, _, body = await asyncio.wait_for(post(client, url, key=key), 5)
        assert status == 409, body
        await asyncio.sleep(0.25)


async def _finish(client, upstream, first: asyncio.Task, url: str, key: str) -> None:
    """The first answer completes and is what the retry replays: one execution."""
    upstream.gate.set()
    s1, _, b1 = await first
    s2, h2, b2 = await post(client, url, key=key)
    assert (s1, s2, b1) == (201, 201, b2) and h2["Idempotent-Replayed"] == "true"
    assert upstream.count("/gate/") == 1


async def test_a_forward_step_one_second_into_a_flight_ends_no_lease(
        faketime_pg, make_proxy, upstream, client):
    """+120 s on the database's clock during a flight: a retry on another replica gets
    409 for two leases and more (the owner's heartbeat keeps moving), then the replay."""
    a, b = await make_proxy(ROUTES, upstream_timeout="30s"), await make_proxy(ROUTES)
    key = new_key()
    first = await _flying(client, upstream, a.url + "/gate/fwd", key)
    faketime_pg.step(+120)
    await _retries_conflict(client, b.url + "/gate/fwd", key, seconds=2.5 * LEASE)
    await _finish(client, upstream, first, b.url + "/gate/fwd", key)
    assert b.metric("idemproxy_claims_taken_over_total", route="gate") == 0


async def test_a_backward_step_during_the_claim_then_back_ends_no_lease(
        faketime_pg, make_proxy, upstream, client):
    """-1 h on the database's clock while the key is claimed, then back: the lease it
    wrote looks an hour old, yet a retry gets 409, then the replay."""
    a, b = await make_proxy(ROUTES, upstream_timeout="30s"), await make_proxy(ROUTES)
    key = new_key()
    faketime_pg.step(-3600)
    first = await _flying(client, upstream, a.url + "/gate/back", key)
    faketime_pg.step(0)
    await _retries_conflict(client, b.url + "/gate/back", key, seconds=2.5 * LEASE)
    await _finish(client, upstream, first, b.url + "/gate/back", key)


async def test_a_dead_claim_is_taken_over_a_lease_after_the_taker_first_saw_it(
        faketime_pg, make_proxy, upstream, client):
    """An owner that stopped renewing (its upstream timed out: outcome unknown) is taken
    over once the taker saw its heartbeat unchanged for a lease of its own clock, not at
    once when a step of the database's clock ends the lease."""
    a = await make_proxy(ROUTES, upstream_timeout="500ms")
    b = await make_proxy(ROUTES)
    key = new_key()
    status, _, _ = await post(client, a.url + "/gate/dead", key=key)
    assert status == 504  # sent, unanswered: the claim stays, no one renews it
    faketime_pg.step(+120)  # the lease has ended on the database's clock
    status, _, _ = await post(client, b.url + "/gate/dead", key=key)
    assert status == 409  # first sight: no evidence yet
    upstream.gate.set()
    loop = asyncio.get_running_loop()
    seen_at = loop.time()
    while (status := (await post(client, b.url + "/gate/dead", key=key))[0]) == 409:
        assert loop.time() - seen_at < 4 * LEASE
        await asyncio.sleep(0.2)
    assert status == 201 and loop.time() - seen_at >= LEASE
    assert b.metric("idemproxy_claims_taken_over_total", route="gate") == 1
    assert upstream.count("/gate/dead") == 2  # executed again, by unknown_outcome: retry


async def test_a_dead_claim_written_while_the_clock_ran_ahead_is_taken_over_a_lease_later(
        faketime_pg, make_proxy, upstream, client):
    """A claim written under a database clock +120 s ahead, whose owner then stops renewing,
    is taken over a lease of the taker's own clock after it first saw it once the clock is
    back, not when the far-future lease ends (torture finding 5: 409 for the step's size)."""
    a = await make_proxy(ROUTES, upstream_timeout="500ms")
    b = await make_proxy(ROUTES)
    key = new_key()
    faketime_pg.step(+120)
    status, _, _ = await post(client, a.url + "/gate/ahead", key=key)
    assert status == 504  # sent, unanswered: the claim stays, its lease ends 120 s ahead
    faketime_pg.step(0)
    status, _, _ = await post(client, b.url + "/gate/ahead", key=key)
    assert status == 409  # first sight: no evidence yet
    upstream.gate.set()
    loop = asyncio.get_running_loop()
    seen_at = loop.time()
    while (status := (await post(client, b.url + "/gate/ahead", key=key))[0]) == 409:
        assert loop.time() - seen_at < 4 * LEASE
        await asyncio.sleep(0.2)
    assert status == 201 and loop.time() - seen_at >= LEASE
    assert b.metric("idemproxy_claims_taken_over_total", route="gate") == 1
    assert upstream.count("/gate/ahead") == 2  # executed again, by unknown_outcome: retry


async def test_the_sweeper_never_deletes_a_flight_on_the_database_clock_alone(
        faketime_pg, make_proxy, upstream, client, store):
    """+25 h (past the window and the lease) during a flight: `purge` and a sweeper pass
    leave the in-flight row, and the retry gets 409, then the replay."""
    a = await make_proxy(ROUTES, upstream_timeout="30s")
    key = new_key()
    first = await _flying(client, upstream, a.url + "/gate/sweep", key)
    faketime_pg.step(+90000)  # 25 h
    await sweep_once(store)  # `idemproxy purge`
    assert (await post(client, a.url + "/gate/sweep", key=key))[0] == 409
    await sweep_once(store, sightings=Sightings(), lease=LEASE)  # the sweeper's pass
    assert (await post(client, a.url + "/gate/sweep", key=key))[0] == 409
    await _finish(client, upstream, first, a.url + "/gate/sweep", key)


async def test_the_sweeper_deletes_a_dead_flight_it_saw_unchanged_for_a_lease(
        store: PostgresStore, db: str):
    """A claim past its window that nobody renews is deleted by the running sweeper on
    its second look, a lease of the sweeper's clock after the first; not on the first."""
    scope, key = f"dead:{uuid.uuid4().hex[:8]}", new_key()
    await store.claim(scope=scope, key=key, fingerprint=b"f", token=uuid.uuid4(),
                      lease=0.1, ttl=0.1)
    await asyncio.sleep(0.2)
    sightings = Sightings()
    await sweep_once(store, sightings=sightings, lease=0.5)
    assert await store.show(scope=scope, key=key) is not None
    await asyncio.sleep(0.6)
    await sweep_once(store, sightings=sightings, lease=0.5)
    assert await store.show(scope=scope, key=key) is None


async def test_a_takeover_needs_the_heartbeat_it_saw_still_there(store: PostgresStore):
    """With the lease ended, a claim presenting the wrong heartbeat (the owner renewed
    since) or none gets the existing row; the one it saw takes it over; the old owner's
    completion is then refused."""
    scope, key, fp = f"beat:{uuid.uuid4().hex[:8]}", new_key(), b"f" * 32
    owner = uuid.uuid4()

    async def claim(seen=None):
        return await store.claim(scope=scope, key=key, fingerprint=fp, token=uuid.uuid4(),
                                 lease=0.1, ttl=60, seen=seen)

    await store.claim(scope=scope, key=key, fingerprint=fp, token=owner, lease=0.1, ttl=60)
    first = await claim()
    assert first.outcome is ClaimOutcome.EXISTING and first.record.heartbeat == 0
    assert await store.extend(scope=scope, key=key, token=owner, lease=0.1)
    await asyncio.sleep(0.2)
    assert (await claim()).outcome is ClaimOutcome.EXISTING  # no evidence
    assert (await claim(first.record.beat)).outcome is ClaimOutcome.EXISTING  # renewed
    now = await claim()
    assert now.record.heartbeat == 1
    assert (await claim(now.record.beat)).outcome is ClaimOutcome.TAKEN_OVER
    assert not await store.complete(scope=scope, key=key, token=owner, notify=False,
                                    done=Completion(200, (), b"x", 0, 1, False))
