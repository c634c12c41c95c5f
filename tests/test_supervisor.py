"""The supervisor (`workers` >= 2) fails loudly: it refuses a port another idemproxy or
another program holds, gives up on workers that keep dying, says unhealthy while no
worker serves, and starts workers that a `proxy/` folder in the cwd cannot take over."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import CLIENT_AUTH, ROOT, free_port
from tests.procs import ProxyProcess, wait_ready
from tests.upstream import TestUpstream

pytestmark = pytest.mark.slow


def write_config(path: Path, *, port: int, admin: int, upstream: str, workers: int) -> Path:
    path.write_text(f"listen: 127.0.0.1:{port}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
                    f"upstream: {{url: '{upstream}'}}\nworkers: {workers}\n"
                    f"data_dir: {path.parent / ('data-' + path.stem)}\n"
                    "logging: {format: json}\n"
                    "routes:\n  - {name: r, match: {methods: [POST], path: '/sup/*'}}\n")
    return path


def start(cfg: Path, db: str, *, cwd: Path = ROOT, argv0: list[str] | None = None,
          port: int, admin: int) -> ProxyProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    env["IDEMPROXY_DATABASE_URL"] = db
    log = cfg.with_suffix(".log")
    cmd = (argv0 or [sys.executable, "-m", "proxy"]) + ["serve", "--config", str(cfg)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return ProxyProcess(proc, port, admin, log)


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


async def test_a_second_idemproxy_on_the_same_port_refuses_to_start(tmp_path, db,
                                                                    upstream: TestUpstream):
    """Two multi-worker proxies on one `listen`: the second exits 1 with one clear line
    (SO_REUSEPORT would have let both share it), and the first keeps every request."""
    port = free_port()
    first = start(write_config(tmp_path / "a.yaml", port=port, admin=(a := free_port()),
                               upstream=upstream.url, workers=2), db, port=port, admin=a)
    try:
        await wait_ready(first, timeout=60)
        second = start(write_config(tmp_path / "b.yaml", port=port, admin=(b := free_port()),
                                    upstream="http://127.0.0.1:9", workers=2),
                       db, port=port, admin=b)
        code = await asyncio.to_thread(second.proc.wait, 30)
        lines = [ln for ln in second.output().splitlines() if ln.startswith("error:")]
        assert code == 1 and lines == [f"error: listen 127.0.0.1:{port}: the port is "
                                       "already in use (another idemproxy or another "
                                       "program listens on it)"], second.output()
        assert "Traceback" not in second.output()
        async with aiohttp.ClientSession(headers=CLIENT_AUTH) as s:
            for _ in range(6):  # new connections each time: all reach the first proxy
                async with s.post(first.url + "/sup/x", data=b"{}", headers={
                        "Idempotency-Key": uuid.uuid4().hex, "Connection": "close"}) as r:
                    assert r.status == 200
    finally:
        first.signal(signal.SIGTERM)
        await asyncio.to_thread(first.proc.wait, 30)
        first.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_port_held_by_another_program_exits_at_once(tmp_path, db, workers):
    """A port some other program listens on: exit 1 with one line, no restart loop."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        p = start(write_config(tmp_path / "c.yaml", port=port, admin=(a := free_port()),
                               upstream="http://127.0.0.1:9", workers=workers),
                  db, port=port, admin=a)
        try:
            code = await asyncio.to_thread(p.proc.wait, 30)
        finally:
            p.stop()
    out = p.output()
    assert code == 1 and "already in use" in out and "restarting" not in out, out
    assert [ln for ln in out.splitlines() if ln.startswith("error:")] == [
        f"error: listen 127.0.0.1:{port}: the port is already in use (another idemproxy "
        "or another program listens on it)"]


async def test_workers_that_keep_dying_end_the_supervisor(tmp_path, db):
    """Workers killed as soon as they start: /healthz says 503 while none serves, and
    after a bounded number of fast restarts the supervisor exits 1 saying why."""
    port, admin = free_port(), free_port()
    p = start(write_config(tmp_path / "d.yaml", port=port, admin=admin,
                           upstream="http://127.0.0.1:9", workers=2), db,
              port=port, admin=admin)
    health: set[int] = set()
    try:
        await wait_ready(p, timeout=60)
        async with aiohttp.ClientSession(headers=CLIENT_AUTH) as s:
            async with s.get(p.admin_url + "/healthz") as r:
                assert r.status == 200
            deadline = time.monotonic() + 90
            while p.proc.poll() is None and time.monotonic() < deadline:
                for child in children(p.proc.pid):
                    try:
                        os.kill(child, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                try:
                    async with s.get(p.admin_url + "/healthz") as r:
                        health.add(r.status)
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        code = await asyncio.to_thread(p.proc.wait, 30)
    finally:
        p.stop()
    out = p.output()
    assert code == 1 and "error: workers keep exiting" in out, out
    assert 503 in health
    assert out.count("worker exited, restarting") < 10


async def test_a_proxy_folder_in_the_cwd_cannot_take_over_the_workers(tmp_path, db,
                                                                      upstream: TestUpstream):
    """Started from a folder holding another `proxy/` package, the installed idemproxy's
    workers still run the installed code (and serve)."""
    fake = tmp_path / "proxy"
    fake.mkdir()
    marker = tmp_path / "hijacked"
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                      "raise SystemExit(3)\n")
    script = Path(sys.executable).parent / "idemproxy"
    argv0 = [str(script)] if script.exists() else [sys.executable, "-P", "-m", "proxy"]
    port, admin = free_port(), free_port()
    p = start(write_config(tmp_path / "e.yaml", port=port, admin=admin,
                           upstream=upstream.url, workers=2), db,
              cwd=tmp_path, argv0=argv0, port=port, admin=admin)
    try:
        await wait_ready(p, timeout=60)
        async with aiohttp.ClientSession(headers=CLIENT_AUTH) as s:
            async with s.post(p.url + "/sup/y", data=b"{}",
                              headers={"Idempotency-Key": uuid.uuid4().hex}) as r:
                assert r.status == 200
        assert not marker.exists() and "restarting" not in p.output()
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(p.proc.wait, 30) == 0
    finally:
        p.stop()
