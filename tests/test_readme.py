"""Every curl line in README.md and docs/*.md, run against `make run` (scripts/run-demo.sh
on random ports, the demo upstream and config/example.yaml): each gets the answer its comment
documents (a block for another config says "not make run" in a comment and is left
out). And a second `make run` says the demo is already running."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
DOCUMENTED = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the manual too
SH_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
STATUS = re.compile(r"^#\s*(\d{3})\b")
DEMO_PORTS = {"8080": "proxy", "9090": "admin"}


@dataclass
class Call:
    """One documented curl line and the answer its comment promises."""

    line: str
    method: str
    target: str  # "proxy" or "admin"
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    data: str | None = None
    status: int = 0
    replayed: bool = False


def parse_curl(line: str, comment: str) -> Call | None:
    """A curl command line as a Call; None when it does not talk to the demo."""
    words = shlex.split(line.split("|")[0])
    assert words[0] == "curl", line
    method, headers, data, url = "", {}, None, ""
    it = iter(words[1:])
    for w in it:
        if w == "-X":
            method = next(it)
        elif w == "-H":
            name, _, value = next(it).partition(":")
            headers[name.strip()] = value.strip()
        elif w in ("-d", "--data"):
            data = next(it)
        elif w.startswith("-"):
            continue  # -i, -s: how curl prints, not what it sends
        else:
            url = w
    m = re.match(r"^(?:https?://)?localhost:(\d+)(/.*)$", url)
    if not m or m.group(1) not in DEMO_PORTS:
        return None
    if data is not None:
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    status = STATUS.match(comment)
    assert status, f"README curl line without its documented answer ('# 201: ...'): {line}"
    return Call(line=line, method=method or ("POST" if data is not None else "GET"),
                target=DEMO_PORTS[m.group(1)], path=m.group(2), headers=headers, data=data,
                status=int(status.group(1)), replayed="replayed" in comment)


def documented_blocks() -> list[list[Call]]:
    """The sh blocks of the README and docs/ that talk to the demo, each a list of calls
    in order."""
    blocks = []
    for block in (b for page in DOCUMENTED for b in SH_BLOCK.findall(page.read_text())):
        if "not make run" in block:  # an example for another config, said so in the block
            continue
        calls: list[Call] = []
        before = ""
        for line in block.replace("\\\n", " ").splitlines():
            text = line.strip()
            if text.startswith("#"):
                before = text
                continue
            if text.startswith("curl "):
                cmd, sep, comment = text.partition(" # ")
                call = parse_curl(cmd, "# " + comment.strip() if sep else before)
                if call is not None:
                    calls.append(call)
            before = ""
        if calls:
            blocks.append(calls)
    return blocks


def test_the_readme_documents_demo_calls():
    """The quick start (README and getting started) and the key-source examples (keys and
    tenancy) are there to be checked."""
    blocks = documented_blocks()
    paths = {c.path for b in blocks for c in b}
    assert {"/v1/charges", "/orders/42", "/v1/emails", "/healthz"} <= paths
    assert any(c.replayed for b in blocks for c in b)
    assert any("order-1834" in c.line for c in blocks[0]), "the README's block comes first"


@pytest.fixture
async def empty_db(db: str) -> AsyncIterator[str]:
    """A database of its own (the README's keys are fixed), dropped afterwards."""
    name = "idemproxy_readme_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(db)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
        yield urlunsplit(urlsplit(db)._replace(path="/" + name))
        await conn.execute(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        await conn.close()


def run_demo(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(["scripts/run-demo.sh", str(Path(sys.executable).parent)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def text_of(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_ready(admin: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            assert proc.poll() is None, text_of(log)
            try:
                async with s.get(admin + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("make run's proxy never became ready:\n" + text_of(log))


async def test_every_readme_curl_line_answers_as_documented(tmp_path, empty_db):
    """Against `make run` on random ports, each README and docs curl line gets its
    documented status, replays say Idempotent-Replayed: true and repeat the first answer's
    body; a second `make run` exits 1 saying the demo is already running."""
    port, admin, up = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    env.update(IDEMPROXY_LISTEN=f"127.0.0.1:{port}", IDEMPROXY_ADMIN_LISTEN=f"127.0.0.1:{admin}",
               DEMO_UPSTREAM_PORT=str(up), IDEMPROXY_DATABASE_URL=empty_db,
               IDEMPROXY_LOG_FORMAT="json")
    log = tmp_path / "demo.log"
    demo = run_demo(env, log)
    try:
        await wait_ready(f"http://127.0.0.1:{admin}", demo, log)
        bases = {"proxy": f"http://127.0.0.1:{port}", "admin": f"http://127.0.0.1:{admin}"}
        async with aiohttp.ClientSession() as s:
            for block in documented_blocks():
                first: dict[str, bytes] = {}
                for c in block:
                    async with s.request(c.method, bases[c.target] + c.path,
                                         headers=c.headers, data=c.data) as r:
                        body = await r.read()
                        assert r.status == c.status, (c.line, r.status, body)
                        replayed = r.headers.get("Idempotent-Replayed") == "true"
                        assert replayed == c.replayed, (c.line, dict(r.headers))
                    if c.replayed:
                        assert body == first[c.path], c.line
                    elif 200 <= c.status < 300:
                        first[c.path] = body
        second_log = tmp_path / "second.log"
        second = run_demo(env, second_log)
        assert await asyncio.to_thread(second.wait, 60) == 1
        out = text_of(second_log)
        assert "already running" in out and "Traceback" not in out, out
        assert "started embedded PostgreSQL" not in out and "Try, in" not in out, out
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(demo.wait, 40)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()


async def test_demo_charge_ids_never_repeat_across_restarts():
    """The demo upstream restarted (a new process start time) hands out new charge ids,
    never the ch_... of a charge the proxy still replays from before the restart."""
    from aiohttp.test_utils import TestClient, TestServer

    from proxy.demo_upstream import create_app
    ids = []
    for started in (1_764_000_000.0, 1_764_000_000.5):
        async with TestClient(TestServer(create_app(started=started))) as c:
            for _ in range(2):
                async with c.post("/v1/charges", data="amount=1") as r:
                    assert r.status == 201
                    ids.append((await r.json())["id"])
    assert len(set(ids)) == 4 and all(i.startswith("ch_") for i in ids), ids
