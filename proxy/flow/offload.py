"""CPU-heavy work of one request, off the event loop (issue #25, item 6).

Canonical JSON costs about 0.8 s per MB in Python: three 9.4 MB webhook bodies
canonicalised on the event loop froze a replica for 24 s, every other request with it.
Key and fingerprint work on a body past a threshold runs on a small thread pool of its
own instead (not the loop's default executor, which DNS lookups share). The loop still
takes its turns: a thread running Python hands the GIL back every switch interval (5 ms),
and hashlib releases it while hashing. Below the thresholds the work is cheaper than the
hop to a thread (~50 µs) is worth: at most a few milliseconds on the loop per request.

Sealing needs no thread: a body is sealed in CHUNK (256 KiB) pieces, one per store write,
each a fraction of a millisecond of AES-GCM.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

CANONICAL_AT = 4 * 1024  # body bytes parsed as JSON (body keys, canonical_json): ~3 ms
HASH_AT = 1024 * 1024  # body bytes only hashed: SHA-256 at ~2 ms per MiB
WORKERS = 2  # Python work shares one GIL: more threads would not go faster


class Offload:
    """Runs a request's CPU-heavy step on the loop or on a thread, by its size."""

    def __init__(self, *, workers: int = WORKERS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers,
                                        thread_name_prefix="idemproxy-cpu")
        self.offloaded = 0  # calls that ran on a thread (tests read it)

    async def run(self, fn: Callable[..., T], /, *args: Any, size: int, canonical: bool,
                  **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`; on a thread when `size` body bytes are past the threshold
        for the work (parsing JSON when `canonical`, else hashing)."""
        if size < (CANONICAL_AT if canonical else HASH_AT):
            return fn(*args, **kwargs)
        self.offloaded += 1
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
