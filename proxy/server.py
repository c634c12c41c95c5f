"""`idemproxy serve`: wire the store, the upstream session and both listeners, then run
until SIGTERM/SIGINT and shut down gracefully.

Shutdown (SIGTERM, or after `POST /admin/drain`): the drain of proxy/lifecycle.py, up to
`shutdown_grace` (/readyz unready, no new claims, in-flight requests and completion
retries finish; the listener still accepts meanwhile, for the clients that have not yet
seen the endpoint go), then the listeners stop; requests cut off before reaching the
upstream release their claims (a sent request keeps its claim until its lease ends: its
outcome is unknown).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from proxy import logs
from proxy.app import App, create_app
from proxy.config import Config
from proxy.context import Deps, default_observer
from proxy.errors import StoreError
from proxy.framing import ProxyRunner
from proxy.metrics import CollectorRegistry, Metrics
from proxy.sealing import keys_from_env
from proxy.store import OpenedStore
from proxy.store.open import open_store
from proxy.store.sweeper import run_sweeper

log = logging.getLogger("idemproxy.server")

# gc thresholds once started (CPython's defaults: 700, 10, 10); see _run_listeners
GC_THRESHOLDS = (20_000, 20, 20)


def check_parser(cfg: Config) -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser unless explicitly allowed.

    The C (llhttp) and Python parsers disagree on edge cases of request framing; a proxy
    whose framing differs from its upstream's is open to request smuggling.
    """
    from aiohttp import http_parser, web_protocol

    c_parser = getattr(http_parser, "HttpRequestParserC", None)
    active = web_protocol.HttpRequestParser  # type: ignore[attr-defined]
    if c_parser is None or active is not c_parser:
        if not cfg.allow_python_parser:
            raise RuntimeError("aiohttp's C HTTP parser is not active (AIOHTTP_NO_EXTENSIONS "
                               "set, or no wheel for this platform); refusing to start. Set "
                               "allow_python_parser: true to run anyway.")
        log.warning("running on aiohttp's pure-Python HTTP parser (allow_python_parser)")


async def serve(cfg: Config, *, worker: bool = False) -> int:
    """Run the proxy. A supervisor's worker (`worker=True`) shares the proxied port with its
    siblings and leaves migrations, the admin listener and the sweeper to the supervisor."""
    check_parser(cfg)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    observer = default_observer(metrics)
    async with open_store(cfg, wait=30, observe=observer.store_timed,
                          observe_batch=observer.store_batched) as store:
        if not worker:
            applied = await store.migrate()
            if applied:
                log.info("applied migrations: %s", ", ".join(applied))
        await open_sealer(cfg, store, on_unreadable=observer.unreadable, quiet=worker)
        async with create_app(cfg, store=store, metrics=metrics, observer=observer) as app:
            return await _run_listeners(cfg, app, store, worker=worker)


async def open_sealer(cfg: Config, store: OpenedStore, *,
                      on_unreadable: Callable[[str], None] | None = None,
                      quiet: bool = False) -> None:
    """Keys from `encryption.keys_env` and the installation secret, into the store; says
    in the log whether stored answers are encrypted (`quiet`: a worker, the supervisor
    says it)."""
    sealer = await store.load_sealer(keys=keys_from_env(cfg.encryption.keys_env),
                                     on_unreadable=on_unreadable)
    if quiet:
        return
    if sealer.primary is None:
        log.warning("stored answers are not encrypted at rest: $%s is not set",
                    cfg.encryption.keys_env)
    else:
        log.info("stored answers are sealed (AES-256-GCM)", extra={"fields": {
            "primary_key": sealer.primary.id, "keys": [k.id for k in sealer.keys]}})


async def _run_listeners(cfg: Config, app: App, store: OpenedStore, *,
                         worker: bool) -> int:
    deps, handler = app.proxied()
    life = app.life
    proxy_runner = ProxyRunner(handler, shutdown_timeout=cfg.shutdown_grace,
                               client=cfg.client,
                               on_write_timeout=deps.metrics.write_timeouts.inc)
    admin_runner = web.AppRunner(app.admin, access_log=None)
    await proxy_runner.setup()
    await admin_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    clock = asyncio.create_task(_track_db_clock(deps))
    log_flusher = asyncio.create_task(logs.flush_periodically())
    orphan_watch: asyncio.Task[None] | None = None
    pool_gauges: asyncio.Task[None] | None = None
    sweeper = None if worker else asyncio.create_task(run_sweeper(
        store, interval=cfg.sweep_interval, on_deleted=deps.observer.swept))
    # Everything built so far lives as long as the process: out of the collector's sight,
    # full collections only walk what requests create (the start-up objects alone made
    # each one ~15 ms).
    gc.collect()
    gc.freeze()
    # A request's objects are freed by reference counting as it ends; the cycle collector
    # only needs to find cycles. At the default (700 allocations) it ran every few
    # requests, each time walking the live objects of every request in flight.
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        await web.TCPSite(proxy_runner, cfg.listen.host, cfg.listen.port,
                          reuse_port=worker).start()
        if worker:
            _report_ready()
            orphan_watch = asyncio.create_task(_stop_when_orphaned(stop))
            pool_gauges = asyncio.create_task(_refresh_pool_gauges(deps))
        else:
            await web.TCPSite(admin_runner, cfg.admin.listen.host,
                              cfg.admin.listen.port).start()
        log.info("idemproxy listening", extra={"fields": {
            "proxy": str(cfg.listen), "admin": "supervisor" if worker else str(cfg.admin.listen),
            "upstream": redact_url(cfg.upstream.url), "routes": len(cfg.routes),
            "pid": os.getpid()}})
        await stop.wait()
        log.info("shutting down: draining", extra={"fields": {"grace_s": cfg.shutdown_grace}})
        life.start_drain()
        if not await life.wait(cfg.shutdown_grace):
            log.warning("the drain did not finish within shutdown_grace",
                        extra={"fields": life.status()})
    finally:
        for task in (sweeper, orphan_watch, pool_gauges, clock, log_flusher):
            if task is not None:
                task.cancel()
        await proxy_runner.cleanup()  # stop accepting; wait up to shutdown_grace
        await _drain(deps)
        await admin_runner.cleanup()
    log.info("stopped")
    return 0


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (even by kill -9) shuts down instead of lingering."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1)
    log.error("supervisor gone; worker shutting down")
    stop.set()


def redact_url(url: str) -> str:
    """The URL without any user:password part, for logs."""
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}{'***@' if '@' in authority else ''}{host}{slash}{path}"


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


async def _drain(deps: Deps) -> None:
    """Let owned background work (releases, completion retries) finish briefly."""
    if deps.tasks:
        _, pending = await asyncio.wait(set(deps.tasks), timeout=5)
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pending, return_exceptions=True)
