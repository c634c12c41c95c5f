"""Responses that carry an upstream's answer as it was sent, first time and on replay.

aiohttp's response writer changes an answer in three ways a proxy must not:

- it adds `Content-Type: application/octet-stream` to any body without one (RFC 9110
  §8.3 lets a recipient guess; a proxy that guesses for it changes the answer);
- it writes header values as UTF-8 and silently drops what is not (an upstream's
  `filename="caf\\xe9.pdf"` in Latin-1 went out as `caf.pdf`): the upstream's bytes come
  to us as surrogate escapes (both clients decode `utf-8`/`surrogateescape`), and are
  written back here as the very bytes received;
- a reason phrase with a control character makes it raise mid-`prepare`, after the
  response has half-started (the 500 that followed was framed wrongly): such a reason
  is dropped at the boundary (`relayable_reason`) and the standard phrase goes out.

The reason phrase itself is kept (stored beside the headers as `REASON`) and replayed.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_writer import StreamWriter

# RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ). aiohttp's writer
# refuses the other controls (its _FORBIDDEN_HEADER_CHARS_RE), CR and LF included.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A pseudo-header in the stored header list: no real field name has a colon in it.
REASON = ":reason"

# aiohttp's private members _AsSent and _write_raw_head read, write or override (aiohttp
# does not promise them; pyproject.toml pins its minor version, and
# tests/test_hostile_upstream.py fails when one disappears or this list misses one).
AIOHTTP_PRIVATES = {
    "StreamResponse": frozenset({
        "_headers", "_req", "_payload_writer", "_status", "_reason",
        "_send_headers_immediately", "_prepare_headers", "_write_headers"}),
    "StreamWriter": frozenset({"_headers_buf", "_headers_written"}),
}


def relayable_reason(reason: str | None) -> str | None:
    """The upstream's reason phrase, or None (the standard phrase) if it has a control
    character: a client must ignore the phrase anyway (RFC 9112 §4)."""
    if reason is None or _CONTROL.search(reason):
        return None
    return reason


def standard_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def with_reason(status: int, reason: str | None, headers: tuple[tuple[str, str], ...]
                ) -> tuple[tuple[str, str], ...]:
    """The headers to store, led by the reason phrase if it is not the standard one."""
    if reason is None or reason == standard_reason(status):
        return headers
    return ((REASON, reason), *headers)


def stored_reason(headers: tuple[tuple[str, str], ...]
                  ) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """(the stored reason phrase or None, the real headers)."""
    if headers and headers[0][0] == REASON:
        return relayable_reason(headers[0][1]), headers[1:]
    return None, headers


class _AsSent:
    """What both response classes change in aiohttp's head writing (see the module)."""

    _headers: Any
    _req: Any
    _payload_writer: Any
    _status: int
    _reason: str
    _send_headers_immediately: bool
    typed = True  # False: the answer had no Content-Type, and gets none

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()  # type: ignore[misc]
        if not self.typed:
            self._headers.popall("Content-Type", None)

    async def _write_headers(self) -> None:
        if not _escaped(self._reason) and not any(_escaped(v) for v in self._headers.values()):
            await super()._write_headers()  # type: ignore[misc]
            return
        version = self._req.version
        lines = [f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}"]
        lines += [f"{k}: {v}" for k, v in self._headers.items()]
        if any(_CONTROL.search(line) for line in lines):  # as aiohttp's writer refuses
            raise ValueError("a control character in the response head")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        _write_raw_head(self._payload_writer, head, now=self._send_headers_immediately)


def _escaped(value: str) -> bool:
    """The value holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    return not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value)


def _write_raw_head(writer: StreamWriter, head: bytes, *, now: bool) -> None:
    """Hand aiohttp's writer a head we serialised ourselves (what its write_headers does
    after serialising; the server's writer has no on_headers_sent callback)."""
    writer._headers_buf = head
    writer._headers_written = False
    if now:
        writer.send_headers()


class Relayed(_AsSent, web.StreamResponse):
    """A streamed answer (first time or replayed) as the upstream sent it."""

    def __init__(self, *, status: int, reason: str | None, typed: bool) -> None:
        super().__init__(status=status, reason=reason)
        self.typed = typed


class RelayedWhole(_AsSent, web.Response):
    """An answer with its whole body at hand, as the upstream sent it."""

    def __init__(self, *, status: int, reason: str | None, body: bytes, typed: bool) -> None:
        super().__init__(status=status, reason=reason, body=body)
        self.typed = typed


def typed(headers: Any) -> bool:
    """Whether an answer's headers (a multidict or pairs) carry a Content-Type."""
    if hasattr(headers, "getall"):
        return "Content-Type" in headers
    return any(k.lower() == "content-type" for k, _ in headers)
