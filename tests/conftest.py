"""Shared fixtures: real PostgreSQL (embedded, or IDEMPROXY_TEST_DATABASE_URL), a recording
test upstream, and the proxy running in-process on a loopback port.

Nothing here mocks the store: every flow test talks to a real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import textwrap
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.app import create_app
from proxy.config import Config, loads
from proxy.flow.context import Deps
from proxy.http.connections import ProxyRunner
from proxy.metrics import Metrics
from proxy.sealing import parse_keys
from proxy.store.migrate import migrate
from proxy.store.migrate import migrations as bundled_migrations
from proxy.store.postgres import PostgresStore
from tests.upstream import TestUpstream

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A real PostgreSQL for the whole session.

    Its data lives outside pytest's numbered tmp dirs: pytest prunes old ones, and a
    concurrent session's pruning must not delete a running server's data directory.
    """
    url = os.environ.get("IDEMPROXY_TEST_DATABASE_URL")
    if url:
        yield url
        return
    data = Path(tempfile.mkdtemp(prefix="idemproxy-test-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from proxy.embedded import embedded_postgres
            with embedded_postgres(data) as url:
                yield url
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
async def db(pg_url: str) -> str:
    """The session database, migrated once."""
    conn = await asyncpg.connect(pg_url)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return pg_url


ALL_MIGRATIONS = bundled_migrations()
CITUS_URLS: set[str] = set()  # databases that are Citus coordinators (citus_db)


@pytest.fixture
async def store(db: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.connect(db, min_size=1, max_size=20, timeout=5,
                                    citus=db in CITUS_URLS)
    await s.load_sealer(keys=())
    yield s
    await s.close()


@pytest.fixture(scope="session")
def citus_cluster() -> Iterator[Any]:
    """A Citus coordinator and two workers for the whole session (tests/citus.py)."""
    from tests.citus import CitusCluster

    cluster = CitusCluster()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
async def citus_db(citus_cluster: Any) -> str:
    """The coordinator's URL, migrated with `database.sharding: citus` once: the schema
    up to 0007 (before Citus support), distributed, then every later migration applied
    to the distributed tables, as on a cluster that upgrades, so a migration Citus
    refuses fails here."""
    from proxy.store import migrate as migrate_module

    conn = await asyncpg.connect(citus_cluster.url)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(migrate_module, "migrations",
                       lambda: [m for m in ALL_MIGRATIONS if m[0] <= 7])
            await migrate(conn, citus=True)
        assert await migrate(conn, citus=True)  # 0008 on: statement by statement
    finally:
        await conn.close()
    url: str = citus_cluster.url
    CITUS_URLS.add(url)
    return url


@pytest.fixture(params=["single", "citus"])
async def layout_db(request: pytest.FixtureRequest, pg_url: str, citus_db: str) -> str:
    """One node, then the Citus cluster: a module whose `db` returns this runs its tests
    (and its `store`, `make_proxy`) on both, so a migration Citus refuses fails there."""
    if request.param == "citus":
        return citus_db
    conn = await asyncpg.connect(pg_url)  # what `db` does (a module overriding it asks)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    return pg_url


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """Serve a test upstream's app on a loopback port 0; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def upstream() -> AsyncIterator[TestUpstream]:
    up = TestUpstream()
    async with serve_app(up.app()) as up.url:
        yield up
        up.gate.set()


def config_for(upstream_url: str, routes_yaml: str, *, extra: str = "",
               upstream_timeout: str = "5s") -> Config:
    text = (f"upstream:\n  url: {upstream_url}\n  timeout: {upstream_timeout}\n{extra}\n"
            "routes:\n") + textwrap.indent(textwrap.dedent(routes_yaml).strip(), "  ")
    return loads(text, env={})


DEFAULT_ROUTES = """
- name: exec
  match: {methods: [POST, PUT, PATCH, DELETE], path: "/exec/*"}
- name: gate
  match: {methods: [POST], path: "/gate/*"}
  require_key: true
- name: any
  match: {methods: [POST, PUT, DELETE], path: "/*"}
"""


@dataclass
class ProxyHandle:
    url: str
    admin_url: str
    deps: Deps
    config: Config
    runner: ProxyRunner | None = None  # the proxied port's (its server's connections)

    def metric(self, name: str, **labels: str) -> float:
        value = self.deps.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
async def make_proxy(db: str, upstream: TestUpstream
                     ) -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    """Start an in-process proxy (real store, real sockets) for the given routes."""
    stack = contextlib.AsyncExitStack()

    async def start(routes: str = DEFAULT_ROUTES, *, extra: str = "",
                    upstream_url: str | None = None, upstream_timeout: str = "5s",
                    encryption_keys: str = "", pool_max: int = 20) -> ProxyHandle:
        cfg = config_for(upstream_url or upstream.url, routes, extra=extra,
                         upstream_timeout=upstream_timeout)
        registry = CollectorRegistry()
        metrics = Metrics(registry)
        st = await PostgresStore.connect(db, min_size=1, max_size=pool_max, timeout=5,
                                         citus=db in CITUS_URLS,
                                         observe=metrics.store_timed,
                                         observe_batch=metrics.store_batched)
        stack.push_async_callback(st.close)
        await st.load_sealer(keys=parse_keys(encryption_keys, source="test"),
                             on_unreadable=metrics.unreadable)
        app = await stack.enter_async_context(create_app(cfg, store=st, metrics=metrics))
        deps, handler = app.proxied()
        assert deps.notifier is not None
        proxy_runner = ProxyRunner(handler, shutdown_timeout=2, client=cfg.client,
                                   on_write_timeout=metrics.write_timeouts.inc)
        admin_runner = web.AppRunner(app.admin, access_log=None)
        for runner in (proxy_runner, admin_runner):
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
        await asyncio.wait_for(deps.notifier.connected.wait(), 5)
        return ProxyHandle(f"http://127.0.0.1:{proxy_runner.addresses[0][1]}",
                           f"http://127.0.0.1:{admin_runner.addresses[0][1]}", deps, cfg,
                           proxy_runner)

    async with stack:
        yield start


@pytest.fixture
async def own_pg(tmp_path: Path) -> AsyncIterator[Any]:
    """A PostgreSQL of the test's own, which it may stop and start (tests.procs)."""
    from tests.procs import DedicatedPostgres

    pg = await asyncio.to_thread(DedicatedPostgres, tmp_path)
    try:
        yield pg
    finally:
        await asyncio.to_thread(pg.cleanup)


# Routes scope keys by Authorization by default, and a guarded request without one is
# refused (issue #17): the shared test client is one authenticated client.
CLIENT_AUTH = {"Authorization": "Bearer test-client"}


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, headers=CLIENT_AUTH) as session:
        yield session
