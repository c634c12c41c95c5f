"""`workers: N > 1`: a supervisor and N worker processes sharing the proxied port.

The supervisor starts the database (embedded, if no URL), applies migrations, runs the
admin listener and the sweeper, and starts N workers (`idemproxy serve` with
IDEMPROXY_WORKER set) that each bind the proxied port with SO_REUSEPORT, so the kernel
spreads connections over every core. Before that, `idemproxy serve` has checked that
nothing listens on the port (proxy/ports.py): SO_REUSEPORT alone would let a second
idemproxy share it silently. Metrics from all processes are aggregated through
prometheus_client's multiprocess mode. SIGTERM is passed on to every worker, which finish
their in-flight requests within `shutdown_grace`.

A worker that dies is restarted, but one that keeps dying young (MAX_FAST_EXITS exits
within FAST_EXIT_S of their start, inside FAST_EXIT_WINDOW_S) ends the supervisor with a
clear error instead of a restart loop. /healthz answers 503 while no worker serves, so a
liveness probe sees a supervisor whose workers are all down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy.config import Config
from proxy.lifecycle import Lifecycle
from proxy.metrics import mark_process_dead
from proxy.runtime import Role, run

log = logging.getLogger("idemproxy.supervisor")

WORKER_ENV = "IDEMPROXY_WORKER"
FAST_EXIT_S = 10.0  # a worker that exits this soon after its start died young
MAX_FAST_EXITS = 5  # this many young deaths ...
FAST_EXIT_WINDOW_S = 60.0  # ... within this long: give up


def worker_command(config_path: str) -> list[str]:
    """`python -P -m proxy serve`: -P (Python 3.11) keeps the current directory off
    sys.path, so a `proxy/` folder where the supervisor was started from cannot stand in
    for the installed package in the workers."""
    return [sys.executable, "-P", "-m", "proxy", "serve", "--config", config_path]


class Workers:
    """The worker processes: started, watched, restarted, and stopped with SIGTERM."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ready_dir = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        self.env = {**os.environ, WORKER_ENV: str(self.ready_dir)}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started: dict[int, float] = {}  # pid -> loop time it was started
        self.fast_exits: deque[float] = deque()
        self.gave_up: str | None = None
        self.stopping = False

    def spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(worker_command(self.cfg.source), env=self.env)
        self.started[proc.pid] = asyncio.get_running_loop().time()
        log.info("worker started", extra={"fields": {"pid": proc.pid}})
        return proc

    def start(self, *, db_url: str) -> None:
        """Start the workers, on the database the supervisor opened (maybe embedded)."""
        self.env["IDEMPROXY_DATABASE_URL"] = db_url
        self.procs = [self.spawn() for _ in range(self.cfg.workers)]

    def middleware(self, life: Lifecycle) -> Middleware:
        return _workers_ready(self, life)

    def cleanup(self) -> None:
        shutil.rmtree(self.ready_dir, ignore_errors=True)

    def _serving(self, proc: subprocess.Popen[bytes]) -> bool:
        """Alive and listening (each worker writes ready-PID once it has bound)."""
        return proc.poll() is None and (self.ready_dir / f"ready-{proc.pid}").exists()

    @property
    def ready(self) -> bool:
        """Every worker alive and listening."""
        return all(self._serving(p) for p in self.procs)

    @property
    def any_serving(self) -> bool:
        return any(self._serving(p) for p in self.procs)

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart workers that die (with a pause, so a crash loop does not spin); set
        `gave_up` and `stop` when they keep dying young."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(1)
            for i, proc in enumerate(self.procs):
                if proc.poll() is None or self.stopping:
                    continue
                mark_process_dead(proc.pid)
                now = loop.time()
                lived = now - self.started.pop(proc.pid, now)
                if lived < FAST_EXIT_S:
                    self.fast_exits.append(now)
                while self.fast_exits and self.fast_exits[0] < now - FAST_EXIT_WINDOW_S:
                    self.fast_exits.popleft()
                if len(self.fast_exits) >= MAX_FAST_EXITS:
                    self.gave_up = (
                        f"workers keep exiting: {len(self.fast_exits)} exited within "
                        f"{FAST_EXIT_S:g}s of their start in the last "
                        f"{FAST_EXIT_WINDOW_S:g}s (the last with code {proc.returncode}); "
                        "giving up (the workers' own lines above say why)")
                    log.error("workers keep exiting; stopping", extra={"fields": {
                        "pid": proc.pid, "code": proc.returncode,
                        "fast_exits": len(self.fast_exits)}})
                    stop.set()
                    return
                log.error("worker exited, restarting", extra={"fields": {
                    "pid": proc.pid, "code": proc.returncode, "lived_s": round(lived, 1)}})
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
    """Run the supervisor (proxy/runtime.py's SUPERVISOR role) and its workers."""
    return await run(cfg, role=Role.SUPERVISOR, pool=Workers(cfg))


def _workers_ready(workers: Workers, life: Lifecycle) -> Middleware:
    """/readyz: every worker serves; /healthz (liveness): at least one does, or a drain
    stopped them."""
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if life.draining:
            return await handler(request)
        if request.path == "/readyz" and not workers.ready:
            return web.json_response({"status": "workers not all ready"}, status=503)
        if request.path == "/healthz" and not workers.any_serving:
            return web.json_response({"status": "no worker serving"}, status=503)
        return await handler(request)
    return check
