"""Transfer codings of an upstream's answer (RFC 9112 §7), undone before anything else.

`Transfer-Encoding` is hop-by-hop: what the proxy relays, stores and replays is the
message body with its transfer codings removed. Both upstream clients undo `chunked`;
the other registered codings (`gzip`, `x-gzip`, `deflate`) are undone here, the same
for both, as the body arrives and in bounded pieces (a small compressed body can expand
a thousandfold). A coding the proxy cannot undo (`compress`, or an unknown one) is an
answer it cannot relay: the upstream acted, so that is the key's stored failure.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from multidict import CIMultiDictProxy

from proxy.sizes import CHUNK

# zlib's wbits per coding: gzip's own header (31), or the zlib wrapper deflate means
# in HTTP (15, RFC 9110 §8.4.1.2).
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


class CodingError(ValueError):
    """A transfer coding the proxy cannot undo, or a body that does not decode."""


def codings(headers: CIMultiDictProxy[str]) -> list[str]:
    """The transfer codings still to undo once `chunked` is gone, in the order applied;
    CodingError for one the proxy does not know."""
    found = [t.strip().lower() for v in headers.getall("Transfer-Encoding", ())
             for t in v.split(",") if t.strip()]
    out = [c for c in found if c not in ("chunked", "identity")]
    for c in out:
        if c not in _WBITS:
            raise CodingError(f"transfer coding {c!r} is not supported")
    return out


class Decoder:
    """Undoes `codings` (as applied, first to last) as the body streams through."""

    def __init__(self, applied: list[str]) -> None:
        self._layers = [zlib.decompressobj(_WBITS[c]) for c in reversed(applied)]

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of `data`, in pieces of at most CHUNK."""
        yield from self._through(0, data)

    def _through(self, i: int, data: bytes) -> Iterator[bytes]:
        if i == len(self._layers):
            if data:
                yield data
            return
        layer = self._layers[i]
        try:
            while data:
                if layer.eof:
                    raise CodingError("bytes after the end of a compressed body")
                out = layer.decompress(data, CHUNK)
                data = layer.unconsumed_tail
                if layer.unused_data:
                    raise CodingError("bytes after the end of a compressed body")
                yield from self._through(i + 1, out)
        except zlib.error as exc:
            raise CodingError(f"the body does not decode: {exc}") from None

    def finish(self) -> None:
        """The body ended: every layer must have reached its own end."""
        if not all(layer.eof for layer in self._layers):
            raise CodingError("the compressed body ended early")
