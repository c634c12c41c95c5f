"""The promise when things break (issue #4): several real proxy processes on one database,
kill -9 mid-request, a zombie whose lease was taken over, Postgres stopped and started
under traffic, SIGTERM during a slow request. Each test is bounded in time and count."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import CLIENT_AUTH
from tests.procs import Cluster, sigcont, sigstop, wait_ready
from tests.test_flow import post
from tests.upstream import TestUpstream, body_json

pytestmark = pytest.mark.slow

ROUTES = """
- name: exec
  match: {methods: [POST], path: "/exec/*"}
  require_key: true
  concurrent: wait
  wait_timeout: 20s
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  require_key: true
  lock_timeout: 1500ms
- name: fail-open
  match: {methods: [POST], path: "/open/*"}
  store_unavailable: pass_through
"""


def new_key() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def cluster(db: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, db)
    try:
        yield c
    finally:
        c.stop_all()


async def test_duplicates_across_three_replicas_execute_once(cluster: Cluster,
                                                             upstream: TestUpstream, client):
    """30 concurrent duplicates spread over 3 proxy processes: one execution, one answer."""
    procs = [await cluster.start(ROUTES, upstream=upstream.url) for _ in range(3)]
    key = new_key()
    results = await asyncio.gather(*[
        post(client, procs[i % 3].url + "/exec/x?delay=0.3", key=key) for i in range(30)])
    assert upstream.count("/exec/x") == 1
    assert {s for s, _, _ in results} == {201}
    assert len({b for _, _, b in results}) == 1


async def test_waiter_on_another_replica_is_woken_on_completion(cluster: Cluster,
                                                                upstream: TestUpstream, client):
    """concurrent: wait — a retry held on replica B gets A's result when A completes."""
    procs = [await cluster.start(ROUTES, upstream=upstream.url) for _ in range(2)]
    key = new_key()
    first = asyncio.create_task(post(client, procs[0].url + "/exec/w?delay=1", key=key))
    while upstream.count("/exec/w") == 0:
        await asyncio.sleep(0.01)
    s, h, body = await post(client, procs[1].url + "/exec/w?delay=1", key=key)
    s1, _, body1 = await first
    assert (s, s1) == (201, 201) and body == body1 and h["Idempotent-Replayed"] == "true"
    assert upstream.count("/exec/w") == 1


async def test_kill_9_mid_request_then_takeover_after_lease(cluster: Cluster,
                                                            upstream: TestUpstream, client):
    """A proxy killed mid-request: retries get 409 during the lease, then take over."""
    a = await cluster.start(ROUTES, upstream=upstream.url)
    b = await cluster.start(ROUTES, upstream=upstream.url)
    key = new_key()
    first = asyncio.create_task(post(client, a.url + "/gate/k", key=key))
    while upstream.count("/gate/k") == 0:
        await asyncio.sleep(0.01)
    a.signal(signal.SIGKILL)
    with pytest.raises(aiohttp.ClientError):
        await first
    s, _, _ = await post(client, b.url + "/gate/k", key=key)
    assert s == 409  # the dead claim's lease is still running
    await asyncio.sleep(1.7)
    upstream.gate.set()
    s2, _, body = await post(client, b.url + "/gate/k", key=key)
    assert s2 == 201 and body_json(body)["n"] == 2  # taken over: executed again, by policy
    s3, h3, body3 = await post(client, b.url + "/gate/k", key=key)
    assert (s3, body3, h3["Idempotent-Replayed"]) == (201, body, "true")


async def test_zombie_proxy_cannot_overwrite_the_new_owners_result(
        cluster: Cluster, upstream: TestUpstream, client):
    """A frozen proxy whose lease was taken over answers late: its write is refused."""
    a = await cluster.start(ROUTES, upstream=upstream.url)
    b = await cluster.start(ROUTES, upstream=upstream.url)
    key = new_key()
    zombie_call = asyncio.create_task(post(client, a.url + "/gate/z", key=key))
    while upstream.count("/gate/z") == 0:
        await asyncio.sleep(0.01)
    sigstop(a)
    try:
        assert (await post(client, b.url + "/gate/z", key=key))[0] == 409  # B sees it
        await asyncio.sleep(1.7)  # A's lease ends while it is frozen (no heartbeat)
        owner_call = asyncio.create_task(post(client, b.url + "/gate/z", key=key))
        while upstream.count("/gate/z") < 2:
            await asyncio.sleep(0.01)
        upstream.gate.set()
        s_b, _, body_b = await owner_call
        assert s_b == 201 and body_json(body_b)["n"] == 2
    finally:
        sigcont(a)
    s_a, _, body_a = await zombie_call  # the zombie's client still gets its own answer
    assert s_a == 201 and body_json(body_a)["n"] == 1
    for proxy in (a, b):  # but the stored result is the new owner's, on every replica
        s, h, body = await post(client, proxy.url + "/gate/z", key=key)
        assert (s, body, h["Idempotent-Replayed"]) == (201, body_b, "true")
    assert "result was not stored: the claim was taken over by another proxy" in a.output()


async def test_postgres_outage_fails_closed_and_recovers(tmp_path: Path, own_pg,
                                                         upstream: TestUpstream, client):
    """Postgres stopped under traffic: guarded 503 + Retry-After, fail-open routes pass
    through marked unguarded, unguarded traffic is untouched, and /readyz stays 200 (no
    cascade) while /readyz?store=1 and idemproxy_store_up show the outage; when it comes
    back the same process recovers on its own."""
    cluster = Cluster(tmp_path, own_pg.url)
    try:
        p = await cluster.start(ROUTES, upstream=upstream.url,
                                extra="database:\n  timeout: 2s\n")
        assert (await post(client, p.url + "/exec/before", key=new_key()))[0] == 201
        await asyncio.to_thread(own_pg.stop)
        s, h, body = await post(client, p.url + "/exec/down", key=new_key())
        assert s == 503 and h["Retry-After"] and body_json(body)["type"].endswith(
            "/store-unavailable")
        s, h, _ = await post(client, p.url + "/open/x", key=new_key())
        assert s == 200 and h["Idempotency-Status"] == "unguarded"
        async with client.get(p.url + "/plain") as r:
            assert r.status == 200
        async with client.post(p.url + "/plain", data=b"{}") as r:  # unrouted POST
            assert r.status == 200
        assert await _readiness(client, p.admin_url) == (200, 503, 0.0)
        await asyncio.to_thread(own_pg.start)
        for _ in range(200):
            if await _readiness(client, p.admin_url) == (200, 200, 1.0):
                break
            await asyncio.sleep(0.1)
        assert await _readiness(client, p.admin_url) == (200, 200, 1.0)
        key = new_key()
        assert (await post(client, p.url + "/exec/after", key=key))[0] == 201
        _, h, _ = await post(client, p.url + "/exec/after", key=key)
        assert h["Idempotent-Replayed"] == "true"
        assert p.proc.poll() is None
    finally:
        cluster.stop_all()


async def _readiness(client: aiohttp.ClientSession, admin: str) -> tuple[int, int, float]:
    """(/readyz status, /readyz?store=1 status, idemproxy_store_up)."""
    async with client.get(admin + "/readyz") as r:
        plain = r.status
    async with client.get(admin + "/readyz?store=1") as r:
        deep = r.status
    async with client.get(admin + "/metrics") as r:
        up = next(float(ln.split()[-1]) for ln in (await r.text()).splitlines()
                  if ln.startswith("idemproxy_store_up "))
    return plain, deep, up


async def test_lost_completion_write_is_retried_within_the_lease(tmp_path: Path, own_pg,
                                                                 upstream: TestUpstream,
                                                                 client):
    """The upstream answered but the store is down: the client gets the answer, and the
    write is retried until the store is back, so the retry replays it."""
    cluster = Cluster(tmp_path, own_pg.url)
    try:
        p = await cluster.start("""
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  lock_timeout: 30s
""", upstream=upstream.url, extra="database:\n  timeout: 2s\n")
        key = new_key()
        call = asyncio.create_task(post(client, p.url + "/gate/lost", key=key))
        while upstream.count("/gate/lost") == 0:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(own_pg.stop)
        upstream.gate.set()
        s, _, body = await call
        assert s == 201 and body_json(body)["n"] == 1
        await asyncio.to_thread(own_pg.start)
        for _ in range(100):
            s2, h2, body2 = await post(client, p.url + "/gate/lost", key=key)
            if s2 == 201:
                break
            await asyncio.sleep(0.2)
        assert (s2, body2, h2.get("Idempotent-Replayed")) == (201, body, "true")
        assert upstream.count("/gate/lost") == 1
    finally:
        cluster.stop_all()


async def test_sigterm_finishes_in_flight_request_and_exits_0(cluster: Cluster,
                                                              upstream: TestUpstream, client):
    """SIGTERM: unready at once, the in-flight request completes and is stored, exit 0."""
    p = await cluster.start(ROUTES, upstream=upstream.url, extra="shutdown_grace: 10s\n")
    other = await cluster.start(ROUTES, upstream=upstream.url)
    key = new_key()
    call = asyncio.create_task(post(client, p.url + "/gate/term", key=key))
    while upstream.count("/gate/term") == 0:
        await asyncio.sleep(0.01)
    p.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert p.proc.poll() is None  # still finishing the request
    upstream.gate.set()
    s, _, body = await call
    assert s == 201
    assert await asyncio.to_thread(p.proc.wait, 15) == 0
    _, h, body2 = await post(client, other.url + "/gate/term", key=key)
    assert body2 == body and h["Idempotent-Replayed"] == "true"


async def test_workers_share_the_port_and_aggregate_metrics(cluster: Cluster,
                                                            upstream: TestUpstream, client):
    """workers: 2 — one supervisor, two workers on one port: exactly-once still holds,
    /metrics adds up every worker, SIGTERM stops them all with exit 0."""
    import psutil

    p = await cluster.start(ROUTES, upstream=upstream.url, workers=2)
    children = psutil.Process(p.proc.pid).children()
    assert len(children) == 2
    keys = [new_key() for _ in range(20)]
    async with aiohttp.ClientSession(headers=CLIENT_AUTH) as fresh:  # spread over workers
        for key in keys:
            await post(fresh, p.url + "/exec/wk", key=key)
        results = await asyncio.gather(*[
            post(aiohttp_session, p.url + "/exec/wk", key=keys[0])
            for aiohttp_session in [fresh] * 10])
    assert upstream.count("/exec/wk") == 20
    assert all(s == 201 for s, _, _ in results)
    async with client.get(p.admin_url + "/metrics") as r:
        text = await r.text()
    line = next(ln for ln in text.splitlines()
                if ln.startswith("idemproxy_requests_total") and 'outcome="forwarded"' in ln
                and 'route="exec"' in ln)
    assert float(line.split()[-1]) == 20.0
    p.signal(signal.SIGTERM)
    assert await asyncio.to_thread(p.proc.wait, 20) == 0
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


async def test_workers_exit_when_the_supervisor_is_killed(cluster: Cluster,
                                                          upstream: TestUpstream):
    """kill -9 of the supervisor leaves no orphaned workers behind."""
    import psutil

    p = await cluster.start(ROUTES, upstream=upstream.url, workers=2)
    children = psutil.Process(p.proc.pid).children()
    p.signal(signal.SIGKILL)
    _, alive = await asyncio.to_thread(psutil.wait_procs, children, 10)
    assert alive == []


GATE_1S = """
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  lock_timeout: 1s
"""


async def _answered_with_the_store_down(cluster: Cluster, own_pg, upstream: TestUpstream,
                                        client, key: str):
    """A proxy (lease 1 s; a drain waits 3 s for its completion retries) whose upstream
    answers `key` while Postgres is stopped."""
    p = await cluster.start(GATE_1S, upstream=upstream.url,
                            extra="database:\n  timeout: 1s\nshutdown_grace: 3s\n")
    call = asyncio.create_task(post(client, p.url + f"/gate/{key}", key=key))
    while upstream.count(f"/gate/{key}") == 0:
        await asyncio.sleep(0.01)
    await asyncio.to_thread(own_pg.stop)
    upstream.gate.set()
    assert (await call)[0] == 201  # the client still gets the upstream's answer
    return p


async def _wait_for_line(p, text: str, *, seconds: float = 20) -> None:
    async with asyncio.timeout(seconds):
        while text not in p.output():
            await asyncio.sleep(0.1)


async def test_completion_lands_after_an_outage_longer_than_the_lease(
        tmp_path: Path, own_pg, upstream: TestUpstream, client):
    """The store is down for longer than the lease: the completion retry keeps going and
    stores the answer once Postgres is back, so a retry replays it (one execution) and no
    record is counted lost."""
    cluster = Cluster(tmp_path, own_pg.url)
    key = new_key()
    try:
        p = await _answered_with_the_store_down(cluster, own_pg, upstream, client, key)
        await _wait_for_line(p, "the lease has ended")  # down past the 1 s lease
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_pg.start)
        await _wait_for_line(p, "result stored after a retry")
        s, h, _ = await post(client, p.url + f"/gate/{key}", key=key)
        assert (s, h.get("Idempotent-Replayed")) == (201, "true")
        assert upstream.count(f"/gate/{key}") == 1
        async with client.get(p.admin_url + "/metrics") as r:
            assert 'idemproxy_records_lost_total{route="gate"} 1.0' not in await r.text()
        assert "record lost" not in p.output()
    finally:
        cluster.stop_all()
        await asyncio.to_thread(own_pg.start)


async def test_completion_given_up_at_shutdown_is_logged_as_lost(
        tmp_path: Path, own_pg, upstream: TestUpstream, client):
    """A proxy stopped while its completion retry still waits for the store drains for
    shutdown_grace, then says the answer was lost, and why, before it exits 0."""
    cluster = Cluster(tmp_path, own_pg.url)
    try:
        p = await _answered_with_the_store_down(cluster, own_pg, upstream, client, new_key())
        await _wait_for_line(p, "storing a result failed, retrying")
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.proc.wait, 30) == 0
        assert "the drain did not finish within shutdown_grace" in p.output()
        assert "record lost" in p.output()
        assert "shut down before the store came back" in p.output()
    finally:
        cluster.stop_all()
        await asyncio.to_thread(own_pg.start)


async def test_two_supervisors_may_share_a_data_dir(cluster: Cluster, upstream: TestUpstream,
                                                    tmp_path: Path):
    """Two multi-worker instances with one data_dir keep their own metrics and readiness."""
    shared = tmp_path / "shared"
    a = await cluster.start(ROUTES, upstream=upstream.url, workers=2, data_dir=shared)
    b = await cluster.start(ROUTES, upstream=upstream.url, workers=2, data_dir=shared)
    await wait_ready(a, timeout=10)
    await wait_ready(b, timeout=10)
