"""WebSocket upgrades on unguarded requests: the one protocol the proxy tunnels.

RFC 9110 §7.8: `Upgrade` and `Connection` are hop-by-hop, so the ordinary proxy path
drops them and the upstream answers as if no upgrade was asked for. For a WebSocket
upgrade no route guards (a GET to a sidecar's app, say), the proxy instead opens a
connection of its own to the upstream, sends the request with `Connection: Upgrade` and
`Upgrade: websocket`, and:

- the upstream answers `101 Switching Protocols` to WebSocket: the 101 goes to the
  client, and from then on bytes are copied both ways unchanged (the frames, their
  masking and the WebSocket close handshake are the two ends' business) until either
  side closes; then the other is closed too;
- it answers a 101 to any other protocol: a 502 problem, nothing is piped;
- it answers anything else: that answer goes to the client as a normal response.

Only WebSocket: a tunnel is never seen by the guard, so a protocol that can carry HTTP
requests (h2c, or one the proxy does not know) would let guarded requests through it
unguarded, each executed as often as it is sent. Any other `Upgrade` is not a tunnel:
the request passes through as an ordinary one, its upgrade fields dropped as the
hop-by-hop fields they are (`wants_tunnel` is false).

Guarded requests never upgrade: a route's method with `Upgrade` is refused before this
module is reached (`errors.UpgradeRefused`), since a tunnel cannot be recorded or replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import httptools
from aiohttp import web

from proxy.errors import (
    UpstreamFailed,
    UpstreamTLSFailed,
    UpstreamUnreachable,
)
from proxy.http import headers as hdrs
from proxy.http.responses import RelayedWhole, relayable_reason
from proxy.upstream import tls as upstream_tls
from proxy.upstream.forward import Forwarder
from proxy.upstream.upgrade_head import CHUNK, MAX_REFUSAL_BODY, UpgradeHead, read_head

log = logging.getLogger("idemproxy.upgrade")

HIGH_WATER = 256 * 1024  # client bytes queued for the upstream above which reading pauses


def asks_upgrade(request: web.BaseRequest) -> bool:
    """The client asks to switch protocols (`Upgrade` named in `Connection`)."""
    if "Upgrade" not in request.headers:
        return False
    tokens = {t.strip().lower() for v in request.headers.getall("Connection", ())
              for t in v.split(",")}
    return "upgrade" in tokens


def wants_tunnel(request: web.BaseRequest) -> bool:
    """A WebSocket upgrade to tunnel: `Upgrade` offers WebSocket and nothing else, and the
    request has no body. Anything else passes through as an ordinary request, `Upgrade`
    dropped as the hop-by-hop field it is, which RFC 9110 §7.8 lets a server (and so a
    proxy) do."""
    return asks_upgrade(request) and not request.body_exists and \
        _only_websocket(request.headers.getall("Upgrade"))


def _only_websocket(values: list[str]) -> bool:
    """Every protocol offered is WebSocket (RFC 6455 §4.2.1: case-insensitive; a
    version suffix like `websocket/13` is not WebSocket's spelling)."""
    offered = [t.strip().lower() for v in values for t in v.split(",")]
    return bool(offered) and all(t == "websocket" for t in offered)


async def tunnel(request: web.BaseRequest, forwarder: Forwarder) -> web.StreamResponse:
    """Forward an upgrade request; on 101, copy bytes both ways until either side ends."""
    reader, writer = await _connect(forwarder)
    try:
        writer.write(_request_head(request, forwarder))
        head = UpgradeHead()
        tail = await read_head(reader, head, timeout=forwarder.head_timeout)
        if head.status != 101:
            return await _refusal(reader, head, tail)
        if not _only_websocket(head.headers.getall("Upgrade", [])):
            raise UpstreamFailed("The upstream switched to a protocol other than WebSocket; "
                                 "only WebSocket is tunnelled.")
        resp = web.StreamResponse(status=101, reason="Switching Protocols")
        for k, v in hdrs.end_to_end(head.headers):
            resp.headers.add(k, v)
        resp.headers["Connection"] = "Upgrade"
        resp.headers["Upgrade"] = "websocket"
        await resp.prepare(request)
        await _pipe(request, resp, reader, writer, tail)
        return resp
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _connect(fwd: Forwarder) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection of its own (a tunnel never goes back to a pool); nothing sent yet."""
    url = fwd.base
    host, port = url.host or "", url.port or (443 if fwd.tls else 80)
    try:
        async with asyncio.timeout(fwd.connect_timeout):
            return await asyncio.open_connection(
                host, port, ssl=fwd.tls,
                server_hostname=(fwd.server_name or host) if fwd.tls else None,
                limit=CHUNK)
    except (ssl.SSLError, ConnectionResetError) as exc:
        if not fwd.tls:  # a plain connection reset while connecting: unreachable
            raise UpstreamUnreachable("Could not connect to the upstream; the request was "
                                      "not sent.") from exc
        log.error("TLS to the upstream failed; the request was not sent",
                  extra={"fields": {"reason": upstream_tls.failure_reason(exc)}})
        raise UpstreamTLSFailed("The TLS handshake with the upstream failed; the request "
                                "was not sent.") from exc
    except TimeoutError as exc:
        raise UpstreamUnreachable("Connecting to the upstream timed out; the request was "
                                  "not sent.") from exc
    except OSError as exc:
        raise UpstreamUnreachable("Could not connect to the upstream; the request was not "
                                  "sent.") from exc


def _request_head(request: web.BaseRequest, fwd: Forwarder) -> bytes:
    # hop-by-hop dropped, Host rewritten (as flow/relay.py does for every request)
    headers = fwd.forwarding.request_headers(request, upstream_host=fwd.host)
    headers["Connection"] = "Upgrade"
    headers["Upgrade"] = request.headers["Upgrade"]
    url = request.rel_url
    target = fwd.base.raw_path.rstrip("/") + url.raw_path + \
        (f"?{url.raw_query_string}" if url.raw_query_string else "")
    lines = [f"{request.method} {target} HTTP/1.1\r\n"]
    lines += [f"{k}: {v}\r\n" for k, v in headers.items()]
    lines.append("\r\n")
    # aiohttp's parser let no CR, LF or NUL through in the client's fields.
    return "".join(lines).encode("utf-8", "surrogateescape")


async def _refusal(reader: asyncio.StreamReader, head: UpgradeHead, tail: bytes
                   ) -> web.Response:
    """A non-101 answer: relayed as a normal response (the client learns it was refused)."""
    with contextlib.suppress(TimeoutError, httptools.HttpParserError, ValueError):
        async with asyncio.timeout(5):
            while not head.complete and len(head.body) <= MAX_REFUSAL_BODY:
                data = await reader.read(CHUNK)
                if not data:
                    with contextlib.suppress(httptools.HttpParserError):
                        head.parser.feed_eof()
                    break
                head.parser.feed_data(data)
    resp = RelayedWhole(status=head.status, reason=relayable_reason(head.reason or None),
                        body=bytes(head.body), typed="Content-Type" in head.headers)
    for k, v in hdrs.end_to_end(head.headers):
        if k.lower() != "content-length":
            resp.headers.add(k, v)
    resp.force_close()
    return resp


class _ToUpstream:
    """Stands in for aiohttp's payload parser once the client's connection is upgraded:
    every byte the client sends goes to the upstream as it arrives."""

    def __init__(self, writer: asyncio.StreamWriter, client: asyncio.Transport) -> None:
        self._writer, self._client = writer, client
        self.closed = asyncio.get_running_loop().create_future()
        self._paused = False
        self._resumer: asyncio.Task[None] | None = None

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if not self._writer.is_closing():
            self._writer.write(data)
            buffered = self._writer.transport.get_write_buffer_size()
            if buffered > HIGH_WATER and not self._paused:
                self._paused = True
                self._client.pause_reading()  # the upstream reads slower than we get
                self._resumer = asyncio.get_running_loop().create_task(self._resume())
        return False, b""

    async def _resume(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            await self._writer.drain()
        self._paused = False
        if not self._client.is_closing():
            self._client.resume_reading()

    def feed_eof(self) -> None:
        """The client closed (or its connection was lost)."""
        if not self.closed.done():
            self.closed.set_result(None)


async def _pipe(request: web.BaseRequest, resp: web.StreamResponse,
                reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                tail: bytes) -> None:
    """Copy both ways until one side closes; then end the other side."""
    protocol, client = request.protocol, request.transport
    assert protocol is not None and client is not None
    protocol.keep_alive(False)  # the connection is no longer HTTP
    to_up = _ToUpstream(writer, client)
    protocol.set_parser(to_up)  # type: ignore[arg-type]  # feeds what it buffered, too
    downstream = asyncio.get_running_loop().create_task(_copy_down(reader, resp, tail))
    try:
        await asyncio.wait({downstream, to_up.closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not downstream.done():  # the client went first: the upstream gets our EOF
            with contextlib.suppress(OSError, RuntimeError, ssl.SSLError):
                if writer.can_write_eof():
                    writer.write_eof()
            try:
                async with asyncio.timeout(5):  # its own close, e.g. the WS close frame
                    await downstream
            except TimeoutError:
                downstream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await downstream
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()
    client.close()


async def _copy_down(reader: asyncio.StreamReader, resp: web.StreamResponse,
                     tail: bytes) -> None:
    try:
        if tail:
            await resp.write(tail)
        while data := await reader.read(CHUNK):
            await resp.write(data)
    except (ConnectionError, RuntimeError, OSError, ssl.SSLError) as exc:
        log.info("upgraded connection ended: %s", type(exc).__name__)
