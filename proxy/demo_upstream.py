"""A tiny fake charges API to put idemproxy in front of (`make run`, tests, benchmarks).

It counts executions, so a replay is visible: the same charge id and count come back.
`python -m proxy.demo_upstream [--port 9000]`
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator

from aiohttp import web

COUNTER: web.AppKey[Iterator[int]] = web.AppKey("counter")


async def create_charge(request: web.Request) -> web.Response:
    counter: Iterator[int] = request.app[COUNTER]
    n = next(counter)
    body = await request.text()
    return web.json_response({"id": f"ch_{n:06d}", "execution": n, "request_body": body},
                             status=201)


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "path": request.path})


def create_app() -> web.Application:
    app = web.Application()
    app[COUNTER] = itertools.count(1)
    app.router.add_post("/v1/charges", create_charge)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    a = p.parse_args()
    web.run_app(create_app(), host=a.host, port=a.port, access_log=None,
                print=lambda *_: print(f"demo upstream on http://{a.host}:{a.port}"))


if __name__ == "__main__":
    main()
