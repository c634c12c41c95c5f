"""`workers: N > 1`: a supervisor and N worker processes sharing the proxied port.

The supervisor starts the database (embedded, if no URL), applies migrations, runs the
admin listener and the sweeper, and starts N workers (`idemproxy serve` with
IDEMPROXY_WORKER set) that each bind the proxied port with SO_REUSEPORT, so the kernel
spreads connections over every core. Metrics from all processes are aggregated through
prometheus_client's multiprocess mode. A worker that dies is restarted; SIGTERM is passed
on to every worker, which finish their in-flight requests within `shutdown_grace`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, multiprocess

from proxy.app import create_admin_app
from proxy.cli import open_store
from proxy.config import Config
from proxy.forward import Forwarder
from proxy.idempotency import Deps
from proxy.metrics import Metrics
from proxy.server import _flush_logs
from proxy.store.postgres import PostgresStore
from proxy.store.sweeper import run_sweeper

log = logging.getLogger("idemproxy.supervisor")

WORKER_ENV = "IDEMPROXY_WORKER"


class Workers:
    """The worker processes: started, watched, restarted, and stopped with SIGTERM."""

    def __init__(self, cfg: Config, *, db_url: str) -> None:
        self.cfg = cfg
        self.ready_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.env = {**os.environ, WORKER_ENV: str(self.ready_dir),
                    "IDEMPROXY_DATABASE_URL": db_url}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "proxy", "serve", "--config", self.cfg.source]
        proc = subprocess.Popen(cmd, env=self.env)
        log.info("worker started", extra={"fields": {"pid": proc.pid}})
        return proc

    def start(self) -> None:
        self.procs = [self.spawn() for _ in range(self.cfg.workers)]

    @property
    def ready(self) -> bool:
        """Every worker alive and listening (each writes ready-PID once it has bound)."""
        return all(p.poll() is None and (self.ready_dir / f"ready-{p.pid}").exists()
                   for p in self.procs)

    async def watch(self) -> None:
        """Restart workers that die (with a pause, so a crash loop does not spin)."""
        while not self.stopping:
            await asyncio.sleep(1)
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.stopping:
                    log.error("worker exited, restarting", extra={"fields": {
                        "pid": proc.pid, "code": proc.returncode}})
                    multiprocess.mark_process_dead(proc.pid)  # type: ignore[no-untyped-call]
                    self.procs[i] = self.spawn()

    async def stop(self, *, grace: float) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace + 5
        while any(p.poll() is None for p in self.procs) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        for proc in self.procs:
            if proc.poll() is None:
                log.error("worker did not stop in time; killing it",
                          extra={"fields": {"pid": proc.pid}})
                proc.kill()
                proc.wait()


async def supervise(cfg: Config) -> int:
    async with open_store(cfg, wait=30) as store:
        applied = await store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        workers = Workers(cfg, db_url=store.url)
        workers.start()
        try:
            return await _run_admin(cfg, store, workers)
        finally:  # _run_admin stops them first, with the admin still answering; this is
            await workers.stop(grace=cfg.shutdown_grace)  # for a failure before that
            shutil.rmtree(workers.ready_dir, ignore_errors=True)


async def _run_admin(cfg: Config, store: PostgresStore, workers: Workers) -> int:
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape)  # type: ignore[no-untyped-call]
    own = Metrics(CollectorRegistry())  # this process's values go to the shared files too
    own.registry = scrape
    state = {"shutting_down": False}
    async with Forwarder.open(cfg.upstream) as unused_forwarder:
        deps = Deps(store=store, forwarder=unused_forwarder, metrics=own)
        app = create_admin_app(cfg, deps, state=state)
        app.middlewares.append(_workers_ready(workers, state))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(workers.watch()),
                 asyncio.create_task(run_sweeper(store, interval=cfg.sweep_interval,
                                                 on_deleted=own.swept.inc)),
                 asyncio.create_task(_flush_logs())]
        try:
            await web.TCPSite(runner, cfg.admin.listen.host, cfg.admin.listen.port).start()
            log.info("idemproxy supervisor running", extra={"fields": {
                "workers": cfg.workers, "proxy": str(cfg.listen),
                "admin": str(cfg.admin.listen)}})
            await stop.wait()
            state["shutting_down"] = True
            log.info("shutting down: stopping workers")
        finally:
            for t in tasks:
                t.cancel()
            await workers.stop(grace=cfg.shutdown_grace)
            await runner.cleanup()
    return 0


def _workers_ready(workers: Workers, state: dict[str, bool]) -> Middleware:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/readyz" and not workers.ready and not state["shutting_down"]:
            return web.json_response({"status": "workers not all ready"}, status=503)
        return await handler(request)
    return check
