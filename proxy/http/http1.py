"""HTTP/1.1 on the wire for the upstream leg (proxy/upstream/client.py): a request's
bytes, framed by us and refused when anything could split it, and where a response's
head ends (RFC 9112)."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

# RFC 9112 §5.2: obs-fold is unfolded before parsing. As aiohttp's client does it (the
# line break goes, the SP or HTAB after it stays), so both clients relay one value.
OBS_FOLD = re.compile(rb"\r?\n(?=[ \t])")
BARE_CR = re.compile(rb"\r(?!\n)")  # RFC 9112 §2.2: invalid, as aiohttp's client says


def head_end(buf: bytes) -> int:
    """Where the head ends: just past the first `\\r?\\n\\r?\\n`; -1 if not yet."""
    crlf = buf.find(b"\n\r\n")  # the usual blank line, after a line's LF
    lf = buf.find(b"\n\n", 0, len(buf) if crlf < 0 else crlf + 1)  # any earlier one
    if lf >= 0:
        return lf + 2
    return -1 if crlf < 0 else crlf + 3


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110
_TARGET = re.compile(r"[\x21-\x7e]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def encode_request(method: str, target: str, headers: Iterable[tuple[str, str]],
                   body: bytes | None) -> bytes:
    """The request's bytes, framed by us; ValueError for anything that could split it."""
    if not _TOKEN.fullmatch(method):
        raise ValueError(f"method {method!r} is not a token")
    if method.upper() in ("HEAD", "CONNECT"):
        raise ValueError(f"{method} is not supported by this client")
    if not _TARGET.fullmatch(target):
        raise ValueError(f"request target {target!r} is not visible ASCII")
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    for name, value in headers:
        if not _framing_name(name):
            lines.append(f"{name}: {value}\r\n")
        elif _BAD_VALUE.search(value):  # dropped, yet refused as any other such value
            raise ValueError(f"header {name} has CR, LF or NUL in its value")
    if body is not None or method not in ("GET", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body or b'')}\r\n")
    lines.append("\r\n")
    text = "".join(lines)
    # Every line written above ends in one CRLF; any other CR, LF (or a NUL) came from a
    # value: one scan of the whole head instead of one per value.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\x00" in text:
        bad = next(line for line in lines if _BAD_VALUE.search(line[:-2]))
        raise ValueError(f"header {bad.partition(':')[0]} has CR, LF or NUL in its value")
    # Undecodable bytes arrive as surrogates (aiohttp's server decodes that way); any
    # other lone surrogate raises UnicodeEncodeError, a ValueError.
    head = text.encode("utf-8", "surrogateescape")
    return head + body if body else head


@functools.lru_cache(maxsize=512)  # names repeat from request to request; refusals raise
def _framing_name(name: str) -> bool:
    """Whether we frame this header ourselves (_FRAMING); ValueError if it is no token."""
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"header name {name!r} is not a token")
    return name.lower() in _FRAMING
