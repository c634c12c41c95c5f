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

Malformed answers (issue 25), while the nemesis's `up_malformed` window is open for the
proxy the request came through (`POST /_nemesis/malformed?proxy=pN&p=P&seconds=S`): the
upstream acted, then answers in one of MALFORMED shapes, written raw on the socket:
`bad_reason` (a control byte in the reason phrase), `bad_chunk` (a valid chunked head,
one chunk, then a chunk size that is not hex), `no_length_204` (204 without
Content-Length). Each is an answer: the proxy must never execute the key again for it.

`X-Torture-Pad: N` in a request (the slow readers send it) pads the answer with N bytes,
so it streams and is recorded in chunks. Bodies over SUMMARY_OVER bytes are logged and
compared as `summarize(body)`: the exec id, the length and a SHA-256.
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

MALFORMED = ("bad_reason", "bad_chunk", "no_length_204")
SUMMARY_OVER = 8192
EXEC_HEADER = "X-Torture-Exec"


def summarize(body: bytes) -> str:
    """The body as text, or for a large one its exec id, length and SHA-256."""
    if len(body) <= SUMMARY_OVER:
        return body.decode("utf-8", "replace")
    try:
        exec_id = json.loads(body).get("exec", "?")
    except (ValueError, AttributeError):
        exec_id = "?"
    return json.dumps({"exec": exec_id, "bytes": len(body),
                       "sha256": hashlib.sha256(body).hexdigest()}, sort_keys=True)


def raw_answer(mode: str, answer: bytes, exec_id: str) -> bytes:
    """The bytes a malformed answer puts on the wire."""
    if mode == "bad_reason":
        return (b"HTTP/1.1 201 Cr\x01ated\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(answer)) + answer
    if mode == "bad_chunk":
        half = answer[:len(answer) // 2]
        return (b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(half)) + half + \
            b"\r\nzz\r\n\r\n"
    if mode == "no_length_204":
        return f"HTTP/1.1 204 No Content\r\n{EXEC_HEADER}: {exec_id}\r\n\r\n".encode()
    raise ValueError(mode)


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
        self.malformed: dict[str, tuple[float, float]] = {}  # proxy -> (p, until)

    async def arm_malformed(self, request: web.Request) -> web.Response:
        """The nemesis opens a window of malformed answers for one proxy's requests."""
        q = request.query
        self.malformed[q["proxy"]] = (float(q["p"]), time.monotonic() + float(q["seconds"]))
        return web.Response(status=204)

    def _malformed(self, proxy: str) -> str | None:
        p, until = self.malformed.get(proxy, (0.0, 0.0))
        if time.monotonic() < until and self.rng.random() < p:
            return self.rng.choice(MALFORMED)
        return None

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
        mode = self._malformed(proxy) or self._mode()
        status = {"release": 503, "no_length_204": 204}.get(mode, 201)
        exec_id = f"{self.boot}-{self.n}"
        fp = fingerprint(request.method, path, body)
        tenant = request.headers.get("Authorization", "")
        key = request.headers.get("Idempotency-Key", "")
        fields = {"exec": exec_id, "tenant": tenant, "route": route, "key": key, "fp": fp}
        pad = int(request.headers.get("X-Torture-Pad", "0") or 0)
        if pad:
            fields["pad"] = "x" * pad
        answer = b"" if status == 204 else json.dumps(fields, sort_keys=True).encode()
        line = json.dumps({"t": time.time(), "exec": exec_id, "proxy": proxy, "route": route,
                           "tenant": tenant, "key": key, "fp": fp, "mode": mode,
                           "status": status, "body": summarize(answer)}, sort_keys=True)
        os.write(self.fd, line.encode() + b"\n")
        os.fsync(self.fd)  # durable before the effect is acknowledged to anyone
        transport = request.transport
        assert transport is not None
        if mode == "reset":
            transport.abort()
            raise asyncio.CancelledError
        if mode in MALFORMED:
            transport.write(raw_answer(mode, answer, exec_id))
            transport.close()  # after the bytes: nothing of aiohttp's own follows them
            raise asyncio.CancelledError
        await asyncio.sleep(self.slow_seconds if mode == "slow" else
                            self.rng.uniform(0.0, 0.06))
        return web.Response(status=status, body=answer, content_type="application/json",
                            headers={EXEC_HEADER: exec_id})


async def main(args: argparse.Namespace) -> None:
    up = Upstream(args.log, seed=args.seed, slow=args.slow, reset=args.reset,
                  release=args.release, slow_seconds=args.slow_seconds)
    app = web.Application()
    app.router.add_post("/_nemesis/malformed", up.arm_malformed)
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
