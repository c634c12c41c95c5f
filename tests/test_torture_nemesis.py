"""The nemesis's issue-25 faults, each shown to do what it claims: the torture upstream's
malformed answers on the wire, database clock steps under libfaketime on a real
PostgreSQL, slow readers that really stop reading, and the checker's rules for them."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.conftest import serve_app
from tests.test_torture_short import att, ex, kinds
from tests.torture.checker import FaultEvent, check
from tests.torture.clients import Clients
from tests.torture.cluster import FAKETIME_LIB, ROOT, Postgres
from tests.torture.slow import PAD, SlowReaders
from tests.torture.upstream import MALFORMED, raw_answer


def test_a_re_execution_after_a_malformed_answer_is_a_violation():
    """The upstream answered (malformed) and nothing on the proxy's side failed: running
    the key again, even after the lease, is a second execution."""
    e1, e2 = ex(10.0, 1, mode="bad_reason"), ex(20.0, 2)
    history = [att(9.9, 10.1, status=502), att(19.9, 20.1, status=201, body=e2.body)]
    assert kinds(check(history, [e1, e2], lease=2)) == ["second-execution"]


def test_a_fault_on_the_proxy_excuses_a_re_execution_after_a_malformed_answer():
    """If the proxy was paused or killed around it, it may never have read the malformed
    answer: a retry after the lease is the documented unknown-outcome re-execution."""
    e1, e2 = ex(10.0, 1, mode="bad_chunk"), ex(20.0, 2)
    history = [att(9.9, 11.1, status=None), att(19.9, 20.1, status=201, body=e2.body)]
    stall = FaultEvent(9.8, "stall", 0, 12.0)
    report = check(history, [e1, e2], lease=2, faults=[stall])
    assert kinds(report) == []
    assert report.reexecutions == [(("Bearer a", "pay", "k1"),
                                    "unknown_outcome: retry after the lease, its proxy was "
                                    "paused (SIGSTOP)")]
    slow = FaultEvent(9.8, "slow_reader", 0, 12.0, "2 readers")  # not an excuse
    assert kinds(check(history, [e1, e2], lease=2, faults=[slow])) == ["second-execution"]


def test_a_204_is_matched_to_its_execution_by_header():
    """A 204 has no body to carry its exec id: the X-Torture-Exec header matches it."""
    e = ex(10.0, 1, status=204, mode="no_length_204")
    e = type(e)(**{**e.__dict__, "body": ""})
    ok = att(9.9, 10.1, status=204, body="")
    ok.exec = e.exec
    assert kinds(check([ok], [e], lease=2)) == []
    ok.exec = "nobody"
    assert kinds(check([ok], [e], lease=2)) == ["foreign-answer"]


def test_a_replay_with_its_body_omitted_stands_for_its_execution():
    """The store failed mid-recording: replays carry `Idempotency-Body: omitted`, no body,
    and the execution's id in a header; that is the documented degradation, not an altered
    or divergent answer. Without the marker an empty body is an altered answer."""
    e = ex(10.0, 1)
    first = att(9.9, 10.1, status=201, body=e.body)
    replay = att(11, 11.1, status=201, body="", replayed=True)
    replay.exec, replay.omitted = e.exec, True
    assert kinds(check([first, replay], [e], lease=2)) == []
    replay.omitted = False
    assert kinds(check([first, replay], [e], lease=2)) == ["altered-answer",
                                                          "divergent-answers"]


@pytest.fixture
async def torture_upstream(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    log = tmp_path / "executions.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.torture.upstream", "--log",
                             str(log), "--slow", "0", "--reset", "0", "--release", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        yield json.loads(line)["port"], log
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _raw_post(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: t\r\n"
                 "Idempotency-Key: k\r\nContent-Length: 2\r\n\r\n{}".encode())
    try:
        return await asyncio.wait_for(reader.read(1 << 20), 10)
    finally:
        writer.close()


async def test_the_torture_upstream_answers_malformed_inside_a_window(torture_upstream):
    """Armed for proxy p0 with p=1, every answer to p0 is one of the malformed shapes,
    byte for byte, and logged with its mode; p1's answers stay well-formed."""
    port, log = torture_upstream
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/_nemesis/malformed",
            params={"proxy": "p0", "p": "1", "seconds": "30"}) as r:
        assert r.status == 204
    seen = set()
    for _ in range(12):
        raw = await _raw_post(port, "/p0/pay/k")
        line = json.loads(log.read_text().splitlines()[-1])
        answer = line["body"].encode()
        assert line["mode"] in MALFORMED
        assert raw == raw_answer(line["mode"], answer, line["exec"])
        seen.add(line["mode"])
    assert seen == set(MALFORMED)
    assert (await _raw_post(port, "/p1/pay/k")).startswith(b"HTTP/1.1 201 Created\r\n")


@pytest.mark.slow
async def test_a_clock_step_moves_the_database_clock_and_back():
    """Postgres under libfaketime: a +120 s step shows in now() within about a second,
    in a connection opened before it too, and stepping to 0 brings real time back."""
    assert FAKETIME_LIB is not None, "libfaketime (the test extra) is not installed"
    root = Path(tempfile.mkdtemp(prefix="idemproxy-dbclock-"))
    pg = Postgres(root)
    try:
        await asyncio.to_thread(pg.start, clock=True)
        conn = await asyncpg.connect(f"postgresql://postgres@/postgres?host="
                                     f"{Path(pg.socket).parent}&port="
                                     f"{pg.socket.rsplit('.', 1)[-1]}")
        try:
            async def offset() -> float:
                db: float = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())")
                return float(db) - time.time()

            assert abs(await offset()) < 5
            pg.step_clock(120)
            for _ in range(50):
                if await offset() > 100:
                    break
                await asyncio.sleep(0.1)
            assert 100 < await offset() < 140
            pg.step_clock(0)
            for _ in range(50):
                if abs(await offset()) < 5:
                    break
                await asyncio.sleep(0.1)
            assert abs(await offset()) < 5
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


class _Big:
    """Serves PAD bytes of JSON and notes when its last write went out."""

    def __init__(self) -> None:
        self.written = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(status=201, headers={"X-Torture-Exec": "e1"})
        resp.content_type = "application/json"
        await resp.prepare(request)
        body = json.dumps({"exec": "e1", "pad": "x" * PAD}).encode()
        for i in range(0, len(body), 65536):
            await resp.write(body[i:i + 65536])
        self.written.set()
        await resp.write_eof()
        return resp


async def test_a_slow_reader_holds_the_writer_then_reads_it_all():
    """While a slow reader stalls, the server cannot finish writing 6 MiB; afterwards the
    reader takes the whole answer and its attempt (phase slow) is in the history."""
    big = _Big()
    app = web.Application()
    app.router.add_post("/{tail:.*}", big.handle)
    clients = Clients(["unused"], seed=1)
    readers = SlowReaders(clients, rng=random.Random(3))
    async with serve_app(app) as url:
        task = asyncio.create_task(readers.read(url, 0, stall=3.0, abandon=False))
        await asyncio.sleep(1.5)
        assert not big.written.is_set()  # blocked: nothing reads the socket
        await task
        await readers.close()
    [a] = clients.history
    assert (a.phase, a.kind, a.status, a.exec) == ("slow", "ok", 201, "e1")
    assert json.loads(a.body)["bytes"] > PAD


def test_small_socket_has_a_small_receive_buffer():
    """The slow readers' sockets ask the kernel for a 4 KiB receive buffer."""
    from tests.torture.slow import RCVBUF, _small_socket

    sock = _small_socket((socket.AF_INET, socket.SOCK_STREAM, 0, "", ("127.0.0.1", 0)))
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 4 * RCVBUF
    finally:
        sock.close()
