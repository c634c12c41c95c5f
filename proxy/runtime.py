"""One process's life, the same for `serve` and for each process of `workers: N`: the
store (opened, migrated), the sealer, the app, its listeners, one `asyncio.TaskGroup` for
every background task, the signals, and the drain.

    SINGLE      `serve` with `workers: 1`: everything in one process
    WORKER      one of the supervisor's workers: the proxied port (SO_REUSEPORT) only
    SUPERVISOR  `workers: N`: migrations, the admin listener, the sweeper, the workers

Shutdown (SIGTERM, or after `POST /admin/drain`): the drain of proxy/lifecycle.py, up to
`shutdown_grace` (/readyz unready, no new claims, in-flight requests and completion
retries finish; the listener still accepts meanwhile, for the clients that have not yet
seen the endpoint go), then the listeners stop; requests cut off before reaching the
upstream release their claims (a sent request keeps its claim until its lease ends: its
outcome is unknown). The supervisor's drain is its workers': each drains on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Middleware

from proxy import logs
from proxy.app import App, create_app
from proxy.config import Config
from proxy.errors import RuntimeFailure, StoreError
from proxy.flow.context import Deps, default_observer
from proxy.http.connections import ProxyRunner
from proxy.lifecycle import Lifecycle
from proxy.metrics import CollectorRegistry, Metrics, multiprocess_registry
from proxy.observe import Observer
from proxy.startup import check_parser, open_sealer, redact_url
from proxy.store import OpenedStore
from proxy.store.open import open_store, retry_unavailable, where
from proxy.store.sweeper import longest_lease, run_sweeper

log = logging.getLogger("idemproxy.server")

# gc thresholds once started (CPython's defaults: 700, 10, 10); see _freeze_start_up
START_WAIT = 30.0  # seconds a start-up waits for an unreachable database, then exits 1
GC_THRESHOLDS = (20_000, 20, 20)


class Role(enum.Enum):
    SINGLE = "single"
    WORKER = "worker"
    SUPERVISOR = "supervisor"


class WorkerPool(Protocol):
    """The supervisor's workers (proxy/supervisor.py), as the runtime drives them."""

    gave_up: str | None  # why the supervisor gave up restarting them, if it did

    def start(self, *, db_url: str) -> None: ...
    async def watch(self, stop: asyncio.Event) -> None: ...
    async def stop(self, *, grace: float) -> None: ...
    def middleware(self, life: Lifecycle) -> Middleware: ...  # /readyz, /healthz
    def cleanup(self) -> None: ...


async def run(cfg: Config, *, role: Role, pool: WorkerPool | None = None) -> int:
    """Run one process of the proxy in `role` until it is stopped; its exit code."""
    proxied = role is not Role.SUPERVISOR
    if proxied:
        check_parser(cfg)
        metrics = Metrics(CollectorRegistry())
    else:  # this process's values go to the shared files; its scrape reads them all
        metrics = Metrics(CollectorRegistry())
        metrics.registry = multiprocess_registry()
    observer = default_observer(metrics)
    async with open_store(cfg, wait=START_WAIT,
                          observe=observer.store_timed if proxied else None,
                          observe_batch=observer.store_batched if proxied else None) as store:
        at = where(store.url)
        if role is not Role.WORKER:
            applied = await retry_unavailable(store.migrate, wait=START_WAIT, where=at,
                                              what="the migrations")
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        await retry_unavailable(lambda: open_sealer(
            cfg, store, on_unreadable=observer.unreadable if proxied else None,
            quiet=role is Role.WORKER), wait=START_WAIT, where=at, what="the installation secret")
        if pool is not None:
            pool.start(db_url=store.url)
        try:
            async with create_app(cfg, store=store, metrics=metrics, observer=observer,
                                  proxied=proxied) as app:
                await _serve(cfg, role, app, store, observer, pool)
        finally:  # stopped already, with the admin still answering; this is for a failure
            if pool is not None:
                await pool.stop(grace=cfg.shutdown_grace)
                pool.cleanup()
    if pool is not None and pool.gave_up:
        raise RuntimeFailure(pool.gave_up)
    return 0


async def _serve(cfg: Config, role: Role, app: App, store: OpenedStore, observer: Observer,
                 pool: WorkerPool | None) -> None:
    """The listeners and the background tasks, until a signal; then the drain."""
    life = app.life
    deps = app.deps
    proxy_runner = None
    if deps is not None and app.handler is not None:
        proxy_runner = ProxyRunner(app.handler, shutdown_timeout=cfg.shutdown_grace,
                                   client=cfg.client,
                                   on_write_timeout=deps.metrics.write_timeouts.inc)
        await proxy_runner.setup()
    if pool is not None:
        life.work = lambda: pool.stop(grace=cfg.shutdown_grace)
        app.admin.middlewares.append(pool.middleware(life))
    admin_runner = web.AppRunner(app.admin, access_log=None)
    await admin_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with _task_group() as group:
        tasks = [group.create_task(c) for c in _background(cfg, role, store, observer,
                                                            deps, stop, pool)]
        if proxy_runner is not None:
            _freeze_start_up()
        try:
            await _listen(cfg, role, proxy_runner, admin_runner)
            await stop.wait()
            await _drain(cfg, role, life)
        finally:
            for task in tasks:
                task.cancel()
            if pool is not None:
                await pool.stop(grace=cfg.shutdown_grace)
            if proxy_runner is not None:
                await proxy_runner.cleanup()  # stop accepting; wait up to shutdown_grace
            if deps is not None:
                await _finish_background_work(deps)
            await admin_runner.cleanup()
    if role is not Role.SUPERVISOR:
        log.info("stopped")


@contextlib.asynccontextmanager
async def _task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """A TaskGroup that raises a lone failure as itself, not wrapped in an ExceptionGroup
    (the command line turns each kind of failure into its own message and exit code)."""
    try:
        async with asyncio.TaskGroup() as group:
            yield group
    except BaseExceptionGroup as group_error:
        if len(group_error.exceptions) == 1:
            raise group_error.exceptions[0] from None
        raise


def _background(cfg: Config, role: Role, store: OpenedStore, observer: Observer,
                deps: Deps | None, stop: asyncio.Event,
                pool: WorkerPool | None) -> list[Coroutine[Any, Any, None]]:
    """Every background task of a process in `role`: owned by its one TaskGroup."""
    tasks = [logs.flush_periodically()]
    if role is not Role.WORKER:
        tasks.append(run_sweeper(store, interval=cfg.sweep_interval,
                                 lease=longest_lease(cfg.routes), on_deleted=observer.swept))
    if deps is not None:
        tasks.append(_track_db_clock(deps))
    if role is Role.WORKER and deps is not None:
        tasks += [_stop_when_orphaned(stop), _refresh_pool_gauges(deps)]
    if pool is not None:
        tasks.append(pool.watch(stop))
    return tasks


async def _listen(cfg: Config, role: Role, proxy_runner: ProxyRunner | None,
                  admin_runner: web.AppRunner) -> None:
    if proxy_runner is not None:
        await web.TCPSite(proxy_runner, cfg.listen.host, cfg.listen.port,
                          reuse_port=role is Role.WORKER).start()
    if role is Role.WORKER:
        _report_ready()
    else:
        await web.TCPSite(admin_runner, cfg.admin.listen.host, cfg.admin.listen.port).start()
    if role is Role.SUPERVISOR:
        log.info("idemproxy supervisor running", extra={"fields": {
            "workers": cfg.workers, "proxy": str(cfg.listen),
            "admin": str(cfg.admin.listen)}})
        return
    log.info("idemproxy listening", extra={"fields": {
        "proxy": str(cfg.listen),
        "admin": "supervisor" if role is Role.WORKER else str(cfg.admin.listen),
        "upstream": redact_url(cfg.upstream.url), "routes": len(cfg.routes),
        "pid": os.getpid()}})


async def _drain(cfg: Config, role: Role, life: Lifecycle) -> None:
    if role is Role.SUPERVISOR:
        log.info("shutting down: stopping workers")
        life.start_drain()
        await life.wait(None)
        return
    log.info("shutting down: draining", extra={"fields": {"grace_s": cfg.shutdown_grace}})
    life.start_drain()
    if not await life.wait(cfg.shutdown_grace):
        log.warning("the drain did not finish within shutdown_grace",
                    extra={"fields": life.status()})


def _freeze_start_up() -> None:
    # Everything built so far lives as long as the process: out of the collector's sight,
    # full collections only walk what requests create (the start-up objects alone made
    # each one ~15 ms).
    gc.collect()
    gc.freeze()
    # A request's objects are freed by reference counting as it ends; the cycle collector
    # only needs to find cycles. At the default (700 allocations) it ran every few
    # requests, each time walking the live objects of every request in flight.
    gc.set_threshold(*GC_THRESHOLDS)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by kill -9) shuts down instead of lingering."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1)
    log.error("supervisor gone; worker shutting down")
    stop.set()


async def _refresh_pool_gauges(deps: Deps) -> None:
    """Workers have no admin listener to refresh on scrape: keep their pool gauges fresh."""
    while True:
        deps.metrics.observe_pool(deps.store.pool)
        deps.metrics.observe_cache(deps.cache)
        await asyncio.sleep(5)


async def _track_db_clock(deps: Deps) -> None:
    """Re-measure the database clock's offset now and then: body-key buckets follow it."""
    while True:
        await asyncio.sleep(60)
        with contextlib.suppress(StoreError):
            deps.db_clock_offset = await deps.store.clock_offset()


def _report_ready() -> None:
    """Tell the supervisor this worker is listening (a file in its shared directory)."""
    ready_dir = os.environ.get("IDEMPROXY_WORKER", "")
    if os.path.isdir(ready_dir):
        Path(ready_dir, f"ready-{os.getpid()}").touch()


async def _finish_background_work(deps: Deps) -> None:
    """Let owned per-request work (releases, completion retries) finish briefly."""
    if deps.tasks:
        _, pending = await asyncio.wait(set(deps.tasks), timeout=5)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)

