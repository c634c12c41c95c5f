"""Record an upstream response into the store while it streams to the client.

Bodies up to `SMALL_BODY` bytes are kept in memory and stored inline with the completion (one
round trip). Larger bodies are written as `CHUNK`-sized rows as they arrive, so memory
stays bounded whatever the size. Past `limit` (max_stored_body) recording stops: the key
is completed with status and headers only, and the body is marked omitted.
"""

from __future__ import annotations

import logging
from uuid import UUID

from proxy.errors import StoreError
from proxy.sizes import CHUNK, SMALL_BODY
from proxy.store import Completion, Store

log = logging.getLogger("idemproxy.recorder")



class Recorder:
    def __init__(self, store: Store, *, scope: str, key: str, token: UUID,
                 limit: int) -> None:
        self._store = store
        self._scope, self._key, self._token = scope, key, token
        self._limit = limit
        self._buf = bytearray()
        self.seq = 0  # chunk rows written
        self.size = 0
        self.omitted = False

    async def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.omitted:
            return
        if self.size > self._limit:
            await self._omit()
            return
        self._buf += chunk
        while len(self._buf) > SMALL_BODY or (self.seq and len(self._buf) >= CHUNK):
            await self._flush(bytes(self._buf[:CHUNK]))
            del self._buf[:CHUNK]
            if self.omitted:
                return

    async def _flush(self, data: bytes) -> None:
        try:
            await self._store.write_chunk(scope=self._scope, key=self._key, token=self._token,
                                          seq=self.seq, data=data)
            self.seq += 1
        except StoreError as exc:
            log.error("storing a response body failed; it will be replayed as omitted: %s",
                      exc)
            await self._omit()

    async def _omit(self) -> None:
        self.omitted = True
        self._buf = bytearray()
        if self.seq:
            self.seq = 0
            try:
                await self._store.delete_chunks(scope=self._scope, key=self._key,
                                                token=self._token)
            except StoreError:
                pass  # orphaned rows: the sweeper removes them once the key expires

    async def discard(self) -> None:
        """Drop what was recorded (the response turned out incomplete)."""
        await self._omit()

    async def finish(self, *, status: int, headers: tuple[tuple[str, str], ...]) -> Completion:
        """Flush the tail and describe what the completion stores."""
        if self.omitted:
            return Completion(status, headers, None, 0, self.size, True)
        if self.seq == 0:
            return Completion(status, headers, bytes(self._buf), 0, self.size, False)
        if self._buf:
            await self._flush(bytes(self._buf))
            self._buf = bytearray()
            if self.omitted:
                return Completion(status, headers, None, 0, self.size, True)
        return Completion(status, headers, None, self.seq, self.size, False)
