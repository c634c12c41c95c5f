"""`idemproxy serve` with no database URL starts an embedded PostgreSQL under data_dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port
from tests.procs import ProxyProcess, wait_ready
from tests.test_flow import post
from tests.upstream import TestUpstream

pytestmark = pytest.mark.slow


async def test_serve_without_database_url_uses_embedded_postgres(tmp_path: Path,
                                                                 upstream: TestUpstream,
                                                                 client):
    """Zero set-up: the log says embedded, data lands in data_dir, replays work."""
    port, admin = free_port(), free_port()
    cfg = tmp_path / "c.yaml"
    # Postgres runs as its own user: its data stays out of pytest's tmp dirs, whose root a
    # concurrent session re-closes to 0700 (initdb then fails with "Permission denied").
    data_dir = Path(tempfile.mkdtemp(prefix="idemproxy-embedded-")) / "state"
    cfg.write_text(f"listen: 127.0.0.1:{port}\nadmin: {{listen: '127.0.0.1:{admin}'}}\n"
                   f"upstream: {{url: '{upstream.url}'}}\nworkers: 1\ndata_dir: {data_dir}\n"
                   "logging: {format: json}\n"
                   "routes:\n  - {name: r, match: {methods: [POST], path: '/exec/*'}}\n")
    env = {k: v for k, v in os.environ.items() if k != "IDEMPROXY_DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "-c", str(cfg)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    p = ProxyProcess(proc, port, admin, log)
    try:
        await wait_ready(p, timeout=60)
        key = uuid.uuid4().hex
        await post(client, p.url + "/exec/emb", key=key)
        _, h, _ = await post(client, p.url + "/exec/emb", key=key)
        assert h["Idempotent-Replayed"] == "true" and upstream.count("/exec/emb") == 1
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        assert "started embedded PostgreSQL" in p.output()
        p.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        p.stop()
        shutil.rmtree(data_dir.parent, ignore_errors=True)
