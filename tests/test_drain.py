"""Drain (issue #27): `POST /admin/drain`, `GET /drainz`, `idemproxy drain --wait` and
SIGTERM stop new claims, let in-flight requests and completion retries finish, and leave
no key held, in the order deploy/kubernetes/README.md documents."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.store.postgres import PostgresStore
from tests.conftest import ROOT
from tests.procs import Cluster
from tests.test_flow import post
from tests.upstream import TestUpstream, body_json

ROUTES = """
- name: drained
  match: {methods: [POST], path: "/gate/*"}
  require_key: true
"""


def new_key() -> str:
    return uuid.uuid4().hex


async def _until_upstream_has(upstream: TestUpstream, path: str) -> None:
    while upstream.count(path) == 0:
        await asyncio.sleep(0.01)


async def test_drain_refuses_new_claims_and_finishes_in_flight(make_proxy, upstream, client):
    """POST /admin/drain mid-request: unready, a new guarded request gets 503 draining
    (not forwarded), unguarded traffic passes, the drain is done once the request ends."""
    p = await make_proxy(ROUTES)
    key = new_key()
    call = asyncio.create_task(post(client, p.url + "/gate/a", key=key))
    await _until_upstream_has(upstream, "/gate/a")
    async with client.post(p.admin_url + "/admin/drain") as r:
        assert r.status == 202 and (await r.json())["state"] == "draining"
    async with client.get(p.admin_url + "/readyz") as r:
        assert r.status == 503
    s, h, body = await post(client, p.url + "/gate/b", key=new_key())
    assert s == 503 and h["Retry-After"] and body_json(body)["type"].endswith("/draining")
    assert upstream.count("/gate/b") == 0
    async with client.get(p.url + "/plain") as r:
        assert r.status == 200
    async with client.get(p.admin_url + "/drainz") as r:
        assert r.status == 503 and (await r.json())["requests_in_flight"] == 1
    upstream.gate.set()
    assert (await call)[0] == 201
    async with client.get(p.admin_url + "/drainz", params={"wait": "5s"}) as r:
        assert r.status == 200 and (await r.json())["state"] == "drained"
    async with client.post(p.admin_url + "/admin/drain") as r:
        assert r.status == 200
    assert p.metric("idemproxy_requests_total", route="drained", outcome="draining") == 1


async def test_drain_wait_is_validated(make_proxy, client):
    """?wait= that is not a duration up to 600s is a 400 problem, and starts nothing."""
    p = await make_proxy(ROUTES)
    async with client.post(p.admin_url + "/admin/drain", params={"wait": "soon"}) as r:
        assert r.status == 400 and r.content_type == "application/problem+json"
    async with client.get(p.admin_url + "/readyz") as r:
        assert r.status == 200


@pytest.fixture
async def cluster(db: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path, db)
    try:
        yield c
    finally:
        c.stop_all()


async def _held_keys(db: str) -> list[str]:
    """In-flight claims of this file's route."""
    store = await PostgresStore.connect(db, min_size=0, max_size=1, timeout=5)
    try:
        return [r["key"] for r in await store.in_flight(limit=10000)
                if r["scope"].startswith("drained:")]
    finally:
        await store.close()


@pytest.mark.slow
async def test_prestop_drain_then_sigterm_leaves_no_key_held(
        cluster: Cluster, db: str, upstream: TestUpstream, client):
    """The ingress order: the proxy's preStop (`idemproxy drain --wait`) and the app's
    (GET /drainz?wait=) both return only after the in-flight request completed; the
    SIGTERM that follows exits 0 at once, and no key stays held."""
    p = await cluster.start(ROUTES, upstream=upstream.url, extra="shutdown_grace: 20s\n")
    key = new_key()
    call = asyncio.create_task(post(client, p.url + "/gate/pre", key=key))
    await _until_upstream_has(upstream, "/gate/pre")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    prestop = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "drain", "--wait", "--timeout", "20s", "--config",
        str(cluster.tmp / "proxy0.yaml"), env=env, stdout=subprocess.PIPE)
    app_prestop = asyncio.create_task(client.get(p.admin_url + "/drainz?wait=20s"))
    await asyncio.sleep(0.5)
    assert prestop.returncode is None and not app_prestop.done()  # the request runs on
    upstream.gate.set()
    s, _, body = await call
    assert s == 201
    assert await asyncio.wait_for(prestop.wait(), 20) == 0
    async with await app_prestop as r:
        assert r.status == 200
    p.signal(signal.SIGTERM)
    assert await asyncio.to_thread(p.proc.wait, 10) == 0
    assert key not in await _held_keys(db)
    other = await cluster.start(ROUTES, upstream=upstream.url)
    _, h, body2 = await post(client, other.url + "/gate/pre", key=key)
    assert body2 == body and h["Idempotent-Replayed"] == "true"


@pytest.mark.slow
async def test_sigterm_mid_request_drains_and_refuses_new_claims(
        cluster: Cluster, db: str, upstream: TestUpstream, client):
    """SIGTERM alone: the listener still answers (clients that have not seen the endpoint
    go), new claims get 503 draining, the in-flight request completes, exit 0, no key
    held."""
    p = await cluster.start(ROUTES, upstream=upstream.url, extra="shutdown_grace: 20s\n")
    key = new_key()
    call = asyncio.create_task(post(client, p.url + "/gate/term", key=key))
    await _until_upstream_has(upstream, "/gate/term")
    p.signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as fresh:  # a new connection, during the drain
        s, _, body = await post(fresh, p.url + "/gate/new", key=new_key(),
                                headers={"Authorization": "Bearer t"})
    assert s == 503 and body_json(body)["type"].endswith("/draining")
    upstream.gate.set()
    assert (await call)[0] == 201
    assert await asyncio.to_thread(p.proc.wait, 10) == 0
    assert key not in await _held_keys(db)


def test_drain_cli_without_a_proxy_fails_clearly(tmp_path: Path):
    """`idemproxy drain` with nothing listening: exit 1 and one line naming the address."""
    out = subprocess.run([sys.executable, "-m", "proxy", "drain", "--admin",
                          "http://127.0.0.1:9"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert out.returncode == 1 and "could not reach the admin listener" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
async def test_a_supervisors_drain_stops_its_workers_without_restarting_them(
        cluster: Cluster, upstream: TestUpstream, client):
    """workers: 2 — POST /admin/drain drains every worker (each takes SIGTERM) and none is
    restarted; /drainz then answers 200, liveness stays 200, SIGTERM exits 0."""
    import psutil

    p = await cluster.start(ROUTES, upstream=upstream.url, workers=2)
    workers = psutil.Process(p.proc.pid).children()
    assert len(workers) == 2
    async with client.post(p.admin_url + "/admin/drain", params={"wait": "20s"}) as r:
        assert r.status == 200 and (await r.json())["state"] == "drained"
    _, alive = await asyncio.to_thread(psutil.wait_procs, workers, 10)
    assert alive == []
    await asyncio.sleep(1.5)  # the supervisor's watch loop would have restarted them
    assert psutil.Process(p.proc.pid).children() == []
    for path, status in (("/drainz", 200), ("/healthz", 200), ("/readyz", 503)):
        async with client.get(p.admin_url + path) as r:
            assert r.status == status, path
    p.signal(signal.SIGTERM)
    assert await asyncio.to_thread(p.proc.wait, 15) == 0
