"""The replay cache's `replay_cache` bytes bound the memory it really takes (issue #25: a
16 MiB cache took ~66 MiB), measured with tracemalloc."""

from __future__ import annotations

import gc
import tracemalloc
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from proxy.flow.cache import ReplayCache
from proxy.store import Record, State, decode_headers, encode_headers

NOW = datetime(2026, 1, 1, tzinfo=UTC)
MAX_BYTES = 4 * 2**20


def stored(i: int, body_len: int, headers: int) -> Record:
    """A completed record as a claim returns it: every string and bytes object its own."""
    pairs = tuple((f"X-Header-{j}", f"{i:036x}-{j}") for j in range(headers))
    return Record(State.COMPLETED, i.to_bytes(32), uuid.UUID(int=i),
                  NOW + timedelta(hours=24, seconds=i % 3600), 201,
                  decode_headers(encode_headers((("Content-Type", "application/json"),
                                                 *pairs))),
                  i.to_bytes(4) * (body_len // 4), 0, body_len, False)


def fill(cache: ReplayCache, *, small: int, body_len: int, headers: int) -> None:
    """`small` small answers, then a few of 60 KiB, each under its own tenant and key."""
    for i in range(small + 20):
        rec = stored(i, 60 * 1024 if i >= small else body_len, headers)
        cache.put(f"charges:{i:064x}", f"{i:032x}", rec, seen=cache.version)


@pytest.mark.parametrize(("body_len", "headers"), [(4, 0), (200, 4), (40, 15), (2000, 2)])
def test_the_cache_stays_within_its_configured_size(body_len, headers):
    """Filled well past its size with small answers (from a 2-byte body and no header to
    15 headers) and a few large ones, the cache's traced memory stays within 1.25x of its
    configured bytes, and it does use most of them."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = ReplayCache(MAX_BYTES)
        cache.set_live(True)
        fill(cache, small=6_000, body_len=body_len, headers=headers)
        cache.forget_id("0" * 32)  # names every entry (the index NOTIFY deletions use)
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.size_bytes > 0.9 * MAX_BYTES
    assert used <= 1.25 * MAX_BYTES, f"{used / 2**20:.1f} MiB for {MAX_BYTES / 2**20:g} MiB"
