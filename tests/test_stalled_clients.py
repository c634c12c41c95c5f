"""Clients that never read their answer hold nothing (issue #25, item 5), over real
sockets and real Postgres: `client.write_timeout` ends a write that makes no progress,
a first request's recording is stored whatever its client does, replays hold no
database connection while they write, and pass-through readers free their upstream
connection. A stalled client here is a raw socket with a small receive buffer that sends
its request and never reads."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.conftest import ProxyHandle
from tests.test_at_rest import K1
from tests.test_edge import port_of
from tests.test_flow import new_key, post
from tests.upstream import pattern

ROUTES = """
- name: big
  match: {methods: [POST], path: /big}
- name: exec
  match: {methods: [POST], path: "/exec/*"}
"""
SIZE = 16 * 2**20  # well over the kernel's socket buffers (tcp_wmem's 4 MiB at most)
AUTH = "Bearer test-client"  # the shared client fixture's tenant


def stalled(port: int, target: str, *, method: str = "GET",
            headers: dict[str, str] | None = None) -> socket.socket:
    """Send one request on a socket with a small receive buffer, and never read it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test", "Content-Length: 0"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    sock.setblocking(False)
    return sock


async def until(check: Callable[[], bool], *, within: float = 30.0) -> None:
    """Wait for an event (polled), failing only past a generous bound."""
    async with asyncio.timeout(within):
        while not check():
            await asyncio.sleep(0.05)


async def until_ok(attempt: Callable[[], Awaitable[bool]], *, within: float = 30.0) -> None:
    async with asyncio.timeout(within):
        while not await attempt():
            await asyncio.sleep(0.1)


def stalled_writes(p: ProxyHandle) -> int:
    """Proxied connections with bytes the client has not taken (its kernel buffers full)."""
    assert p.runner is not None and p.runner.server is not None
    return sum(1 for h in p.runner.server.connections
               if h.transport is not None and h.transport.get_write_buffer_size() > 0)


async def drain(sock: socket.socket, *, pause: float = 0.0, every: int = 2**20) -> int:
    """Read until the connection ends (EOF or reset); the bytes received. With `pause`,
    sleep that long after each `every` bytes (a slow reader that keeps reading)."""
    loop = asyncio.get_running_loop()
    got, since = 0, 0
    async with asyncio.timeout(60):
        while True:
            try:
                data = await loop.sock_recv(sock, 65536)
            except ConnectionError:
                return got
            if not data:
                return got
            got += len(data)
            since += len(data)
            if pause and since >= every:
                since = 0
                await asyncio.sleep(pause)


async def test_a_reader_that_never_reads_is_cut_after_write_timeout(make_proxy, upstream,
                                                                    caplog):
    """An unguarded 16 MiB answer to a client that reads nothing: after write_timeout the
    connection is ended, logged and counted, and the client never gets the whole body."""
    p = await make_proxy(ROUTES, extra="client:\n  write_timeout: 1s\n")
    sock = stalled(port_of(p.url), f"/big?size={SIZE}&length=1")
    with caplog.at_level(logging.INFO, logger="idemproxy.framing"):
        await until(lambda: p.metric("idemproxy_client_write_timeouts_total") >= 1)
    got = await drain(sock)
    sock.close()
    assert got < SIZE
    assert any(r.getMessage() == "client write timed out" for r in caplog.records)


async def test_a_slow_reader_that_keeps_reading_is_not_cut(make_proxy, upstream):
    """A client that reads in bursts with pauses shorter than write_timeout gets the
    whole answer: only a write that makes no progress at all is ended."""
    p = await make_proxy(ROUTES, extra="client:\n  write_timeout: 2s\n")
    size = 12 * 2**20
    sock = stalled(port_of(p.url), f"/big?size={size}&length=1",
                   headers={"Connection": "close"})
    got = await drain(sock, pause=0.4)
    sock.close()
    assert got > size  # head and the whole body, until the proxy closed
    assert p.metric("idemproxy_client_write_timeouts_total") == 0


async def test_stalled_readers_free_their_upstream_connections(make_proxy, upstream):
    """With upstream.max_connections 2, two clients that never read a large unguarded
    GET stop holding both upstream connections after write_timeout: others are served."""
    p = await make_proxy(ROUTES, extra="  max_connections: 2\n"
                                       "client:\n  write_timeout: 1s\n")
    port = port_of(p.url)
    socks = [stalled(port, f"/big?size={SIZE}&length=1") for _ in range(2)]
    await until(lambda: upstream.count("/big") == 2)
    size = 300 * 1024

    async def served() -> bool:
        async with aiohttp.ClientSession() as s, s.get(
                p.url + f"/big?size={size}&length=1") as resp:
            return resp.status == 200 and await resp.read() == pattern(size)

    await until_ok(served)
    for sock in socks:
        sock.close()
    assert p.metric("idemproxy_client_write_timeouts_total") >= 1


async def read_all(sock: socket.socket) -> bytes:
    """Everything until the proxy closes the connection."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    async with asyncio.timeout(60):
        while chunk := await loop.sock_recv(sock, 1 << 20):
            data += chunk
    return bytes(data)


@pytest.mark.parametrize("keys", ["", K1], ids=["plain", "sealed"])
async def test_a_first_request_whose_client_stalls_is_stored(make_proxy, upstream, client,
                                                             keys):
    """A guarded 16 MiB answer whose client stops reading (write_timeout far away): the
    recording finishes the upstream read and stores it without that client, so a retry
    soon gets the replay (not 409 while the client stalls), the upstream ran once, and
    the stalled client, once it reads, gets the whole answer byte for byte (the rest
    from the store, sealed or not)."""
    p = await make_proxy(ROUTES, extra="client:\n  write_timeout: 60s\n",
                         encryption_keys=keys)
    key = new_key()
    target = f"/big?size={SIZE}&length=1"
    sock = stalled(port_of(p.url), target, method="POST", headers={
        "Authorization": AUTH, "Idempotency-Key": key, "Connection": "close"})
    await until(lambda: upstream.count("/big") == 1)
    answer: list[tuple[int, dict[str, str], bytes]] = []

    async def replayed() -> bool:
        answer[:] = [await post(client, p.url + target, key=key, data=b"")]
        return answer[0][0] != 409

    await until_ok(replayed)
    assert stalled_writes(p) >= 1  # the first client is still there, still not reading
    status, headers, body = answer[0]
    assert status == 200 and headers.get("Idempotent-Replayed") == "true"
    assert body == pattern(SIZE)
    head, _, first = (await read_all(sock)).partition(b"\r\n\r\n")
    sock.close()
    assert head.startswith(b"HTTP/1.1 200 ") and first == pattern(SIZE)
    assert upstream.count("/big") == 1
    assert p.metric("idemproxy_client_write_timeouts_total") == 0


async def test_stalled_replays_hold_no_database_connection(make_proxy, upstream, client):
    """With database.pool_max 3, three clients stalled on replays of a 16 MiB stored
    answer (write_timeout far away) leave the pool free: another tenant's guarded
    request is executed (not 503) and another replay of the answer is whole."""
    p = await make_proxy(ROUTES, extra="client:\n  write_timeout: 60s\n", pool_max=3)
    key = new_key()
    target = f"/big?size={SIZE}&length=1"
    status, _, body = await post(client, p.url + target, key=key, data=b"")
    assert status == 200 and len(body) == SIZE
    port = port_of(p.url)
    socks = [stalled(port, target, method="POST",
                     headers={"Authorization": AUTH, "Idempotency-Key": key})
             for _ in range(3)]
    await until(lambda: stalled_writes(p) == 3)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer other"}) as other:
        status, _, _ = await post(other, p.url + "/exec/other-tenant", key=new_key())
    assert status == 201
    status, headers, body = await post(client, p.url + target, key=key, data=b"")
    assert headers.get("Idempotent-Replayed") == "true" and body == pattern(SIZE)
    for sock in socks:
        sock.close()
    assert upstream.count("/big") == 1
