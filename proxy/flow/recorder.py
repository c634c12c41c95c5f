"""Record an upstream response into the store while it streams to the client.

Bodies up to `SMALL_BODY` bytes are kept in memory and stored inline with the completion (one
round trip). Larger bodies are written as `CHUNK`-sized rows as they arrive, so memory
stays bounded whatever the size. Past `limit` (max_stored_body) recording stops: the key
is completed with status and headers only, and the body is marked omitted.

A chunk write that fails (the store is down) also ends recording as omitted; the chunks
already written then belong to no answer. They are deleted at once, or, the store being
down, by a background retry once it is back (`spawn`), and failing that by the sweeper
(store/sweeper.py), rather than left until the key expires (issue 25).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any
from uuid import UUID

from proxy.errors import StoreError
from proxy.sizes import CHUNK, SMALL_BODY
from proxy.store import Completion, Store

log = logging.getLogger("idemproxy.recorder")

# Retrying the deletion of a failed recording's chunks: quick at first (a failover takes a
# second or two), then once a second until the store answers.
RETRY_FIRST, RETRY_MAX = 0.1, 1.0
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class Recorder:
    def __init__(self, store: Store, *, scope: str, key: str, token: UUID,
                 limit: int, spawn: Spawn | None = None) -> None:
        self._store = store
        self._spawn = spawn  # runs an owned background task (Deps.spawn)
        self._scope, self._key, self._token = scope, key, token
        self._limit = limit
        self._buf = bytearray()
        self.seq = 0  # chunk rows written
        self._tried = False  # a chunk write was sent (a failed one may still have landed)
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
        self._tried = True
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
        if self._tried:
            self.seq, self._tried = 0, False
            try:
                await self._delete_chunks()
            except StoreError:
                if self._spawn is not None:
                    self._spawn(self._delete_chunks_later())

    async def _delete_chunks(self) -> None:
        await self._store.delete_chunks(scope=self._scope, key=self._key, token=self._token)

    async def _delete_chunks_later(self, *, first: float = RETRY_FIRST,
                                   most: float = RETRY_MAX) -> None:
        """Retry until the store takes the deletion (or shutdown cancels it: the sweeper
        removes the chunks then, as it does those of a proxy that crashed)."""
        delay = first
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, most)
            try:
                await self._delete_chunks()
            except StoreError:
                continue
            log.info("chunks of a failed recording deleted after a retry")
            return

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
