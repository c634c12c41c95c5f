"""The byte sizes the flow shares (one place, so streaming, recording and storing agree).

CHUNK: the unit bodies move in: read from the upstream, written to the store as one row,
and read back from it. SMALL_BODY: a response of known length up to this is read whole
and answered in one write (and, guarded, stored inline with its completion: one round
trip); anything larger streams. SMALL_UPLOAD: an unguarded request body of declared length
up to this is read whole and sent by our own upstream client (one write; aiohttp's
streamed upload costs about three times the CPU); a larger or chunked one streams.
"""

from __future__ import annotations

CHUNK = 256 * 1024
SMALL_BODY = 256 * 1024
SMALL_UPLOAD = 64 * 1024
