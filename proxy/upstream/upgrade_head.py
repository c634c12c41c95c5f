"""The upstream's answer to a WebSocket upgrade request (proxy/upstream/websocket.py), parsed by
llhttp: the final head (interim 1xx skipped), a 101's first tunnelled bytes, or a small
refusal's body."""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from multidict import CIMultiDict

from proxy.errors import UpstreamFailed, UpstreamTimeout

CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024  # the upstream's response head
MAX_REFUSAL_BODY = 1024 * 1024  # the body of a non-101 answer, relayed whole


class UpgradeHead:
    """httptools callbacks collecting the upstream's response (head, and a small body)."""

    def __init__(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.done_head = self.complete = False
        self.body = bytearray()
        self.parser: Any = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.done_head:
            self.headers.add(name.decode("latin-1"), value.decode("latin-1"))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200 and self.status != 101:  # interim: the next head
            self.headers, self.reason = CIMultiDict(), ""
            return
        self.done_head = True

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > MAX_REFUSAL_BODY:
            raise ValueError("refusal body too large")

    def on_message_complete(self) -> None:
        if self.done_head:
            self.complete = True


async def read_head(reader: asyncio.StreamReader, head: UpgradeHead, *,
                     timeout: float | None) -> bytes:
    """Feed the parser until the final head; returns bytes already past a 101's head."""
    seen = 0
    try:
        async with asyncio.timeout(timeout):
            while not head.done_head:
                data = await reader.read(CHUNK)
                if not data:
                    raise UpstreamFailed("The upstream closed the connection before "
                                         "answering the upgrade; the outcome is unknown.")
                seen += len(data)
                if seen > MAX_HEAD + MAX_REFUSAL_BODY:
                    raise UpstreamFailed("The upstream's answer to the upgrade is too "
                                         "large.")
                try:
                    head.parser.feed_data(data)
                except httptools.HttpParserUpgrade as exc:  # the 101: the rest is the tunnel
                    return data[exc.args[0]:] if exc.args else b""
                except (httptools.HttpParserError, ValueError) as exc:
                    raise UpstreamFailed("The upstream's answer to the upgrade is "
                                         "malformed.") from exc
    except TimeoutError as exc:
        raise UpstreamTimeout("The upstream did not answer the upgrade in time.") from exc
    return b""
