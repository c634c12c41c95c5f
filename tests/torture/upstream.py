"""The torture upstream: one durable line per execution, written before it answers.

    python -m tests.torture.upstream --port 0 --log FILE --seed 1 [--slow P --reset P ...]

Paths are `/p<N>/<route>/<key>`: `p<N>` names the proxy whose link the request came
through (each proxy's upstream URL carries its own prefix), the rest is what the client
asked for. Each execution appends one JSON line (time, proxy, route, tenant, key,
fingerprint, mode, status, response body) to the log and fsyncs it *before* acting on its
mode, so the log holds every execution, answered or not, even if this process dies.

Modes, drawn per execution: `ok` (201), `release` (503, a release status: the proxy must
pass it on and release the key), `slow` (answers after the proxy's upstream timeout:
the outcome is unknown to the proxy), `reset` (drops the connection unanswered).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import time

from aiohttp import web


def fingerprint(method: str, path: str, body: bytes) -> str:
    """What the checker compares: method, path (without the proxy prefix) and body."""
    return hashlib.sha256(method.encode() + b"\0" + path.encode() + b"\0" + body).hexdigest()


class Upstream:
    def __init__(self, log_path: str, *, seed: int, slow: float, reset: float,
                 release: float, slow_seconds: float) -> None:
        self.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.rng = random.Random(seed)
        self.slow, self.reset, self.release = slow, reset, release
        self.slow_seconds = slow_seconds
        self.boot = f"{os.getpid():x}"
        self.n = 0

    def _mode(self) -> str:
        x = self.rng.random()
        if x < self.release:
            return "release"
        if x < self.release + self.slow:
            return "slow"
        if x < self.release + self.slow + self.reset:
            return "reset"
        return "ok"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parts = request.path.split("/", 4)  # '', pN, route, key
        proxy, route = parts[1], parts[2] if len(parts) > 2 else ""
        path = "/" + "/".join(parts[2:])
        self.n += 1
        mode = self._mode()
        status = 503 if mode == "release" else 201
        exec_id = f"{self.boot}-{self.n}"
        fp = fingerprint(request.method, path, body)
        tenant = request.headers.get("Authorization", "")
        key = request.headers.get("Idempotency-Key", "")
        answer = json.dumps({"exec": exec_id, "tenant": tenant, "route": route, "key": key,
                             "fp": fp}, sort_keys=True)
        line = json.dumps({"t": time.time(), "exec": exec_id, "proxy": proxy, "route": route,
                           "tenant": tenant, "key": key, "fp": fp, "mode": mode,
                           "status": status, "body": answer}, sort_keys=True)
        os.write(self.fd, line.encode() + b"\n")
        os.fsync(self.fd)  # durable before the effect is acknowledged to anyone
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        await asyncio.sleep(self.slow_seconds if mode == "slow" else
                            self.rng.uniform(0.0, 0.06))
        return web.Response(status=status, body=answer.encode(),
                            content_type="application/json")


async def main(args: argparse.Namespace) -> None:
    up = Upstream(args.log, seed=args.seed, slow=args.slow, reset=args.reset,
                  release=args.release, slow_seconds=args.slow_seconds)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", up.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--slow", type=float, default=0.01)
    p.add_argument("--reset", type=float, default=0.01)
    p.add_argument("--release", type=float, default=0.03)
    p.add_argument("--slow-seconds", type=float, default=2.5)
    try:
        asyncio.run(main(p.parse_args()))
    except KeyboardInterrupt:
        sys.exit(0)
