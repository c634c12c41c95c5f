"""A tiny fake charges API to put idemproxy in front of (`make run`, tests, benchmarks).

It counts executions, so a replay is visible: the same charge id and count come back.
Charge ids carry the moment this process started (`ch_<start>_<n>`), so a new charge
after a restart never gets the id of one the proxy still replays from before it.
`python -m proxy.demo_upstream [--port 9000]`
"""

from __future__ import annotations

import argparse
import itertools
import socket
import sys
import time
from collections.abc import Iterator

from aiohttp import web

COUNTER: web.AppKey[Iterator[int]] = web.AppKey("counter")
EPOCH: web.AppKey[str] = web.AppKey("epoch")


async def create_charge(request: web.Request) -> web.Response:
    counter: Iterator[int] = request.app[COUNTER]
    n = next(counter)
    body = await request.text()
    return web.json_response({"id": f"ch_{request.app[EPOCH]}_{n:06d}", "execution": n,
                              "request_body": body}, status=201)


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "path": request.path})


def create_app(*, started: float | None = None) -> web.Application:
    app = web.Application()
    app[COUNTER] = itertools.count(1)
    # Microseconds since the epoch in base 36: distinct for every start of the process.
    app[EPOCH] = _base36(int((time.time() if started is None else started) * 1e6))
    app.router.add_post("/v1/charges", create_charge)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out or "0"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args()
    sock = socket.socket(socket.AF_INET6 if ":" in a.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((a.host, a.port))
    except OSError as exc:
        sock.close()
        print(f"demo upstream: cannot listen on {a.host}:{a.port}: {exc.strerror} (is the "
              "demo already running?)", file=sys.stderr)
        raise SystemExit(1) from None
    web.run_app(create_app(), sock=sock, access_log=None,
                print=lambda *_: print(f"demo upstream on http://{a.host}:{a.port}"))


if __name__ == "__main__":
    main()
