"""Completed small responses kept in this process, so a hot retry needs no round trip.

Safe because a completed record never changes in the database: it only expires, which
is checked here against the database's clock with a margin, or is deleted by an operator
(`keys delete`, `DELETE /admin/keys`), which NOTIFYs every replica to drop it. While this
process's LISTEN connection is down the cache is emptied and off: a deletion could be
missed. Every entry is also dropped after `MAX_AGE`, a backstop that bounds how long a
deletion done behind the proxy's back (plain SQL) can go unseen.

Only inline bodies up to `MAX_ENTRY` bytes are kept; the cache is an LRU bounded by the
bytes it holds (`replay_cache` in the config; 0 turns it off).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any
from uuid import UUID

from proxy.store import Record, State, notify_channel_id

MAX_ENTRY = 64 * 1024  # a body larger than this is always replayed from the database
MAX_AGE = 60.0  # seconds an entry may be served without the database being asked again
EXPIRY_MARGIN = 1.0  # stop serving this long before the database's expiry
# What an entry costs beyond the characters and bytes it holds, so `replay_cache` bounds
# the memory the cache really takes (issue #25: a 16 MiB cache took ~66 MiB, counted as
# body + header text + 256). CPython sizes, checked with tracemalloc by
# tests/test_replay_cache.py: per entry, the entry tuple with its floats, ints, token,
# datetime and fingerprint (~330), the (scope, key) tuple and its two str objects (~150),
# the headers tuple and body object (~75), its slots in the OrderedDict and the two
# naming dicts, with their spare capacity, and its md5 name (~450); per header, the
# (name, value) tuple, its two str objects and its slot (~165).
_ENTRY_OVERHEAD = 1024
_HEADER_OVERHEAD = 168


# An entry is a tuple of plain values (no Record, UUID or dataclass): the garbage
# collector stops tracking such tuples, so a full cache adds nothing to its pauses (with
# Record objects, 24k entries made each full collection ~90 ms instead of ~15 ms).
# Its fields, by position:
_EXPIRES, _FRESH, _SIZE, _STATUS, _HEADERS, _BODY, _FP, _TOKEN, _EXPIRES_AT = range(9)


def entry_cost(scope: str, key: str, body: bytes,
               headers: tuple[tuple[str, str], ...]) -> int:
    """The bytes an entry is counted as: what it holds plus the overheads above."""
    return (len(body) + len(scope) + len(key) + _ENTRY_OVERHEAD
            + sum(len(k) + len(v) + _HEADER_OVERHEAD for k, v in headers))


class ReplayCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], tuple[Any, ...]] = OrderedDict()
        # NOTIFY names a key by its md5 (notify_channel_id). Deletions are rare and puts
        # come with every first request, so entries are named lazily: at the first
        # forget_id after their put, each entry's md5 is computed once.
        self._by_id: dict[str, tuple[str, str]] = {}
        self._ids: dict[tuple[str, str], str] = {}  # entries named in _by_id
        self._unnamed: dict[tuple[str, str], None] = {}  # entries not named yet
        self._bytes = 0
        self.live = False  # set while the LISTEN connection is up (see store/notify.py)
        # Bumped by every forget and clear. A caller reads it before fetching a record and
        # hands it to put(): a deletion heard in between (its NOTIFY can overtake the
        # answer it invalidates) makes the put a no-op instead of caching a deleted key.
        self.version = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, scope: str, key: str, *, db_now: float) -> Record | None:
        """The completed record for (scope, key) if held, fresh and not about to expire."""
        if not self.live:
            return None
        entry = self._entries.get((scope, key))
        if entry is None:
            return None
        if db_now >= entry[_EXPIRES] or time.monotonic() >= entry[_FRESH]:
            self._drop((scope, key))
            return None
        self._entries.move_to_end((scope, key))
        body = entry[_BODY]
        return Record(State.COMPLETED, entry[_FP], UUID(int=entry[_TOKEN]), entry[_EXPIRES_AT],
                      entry[_STATUS], entry[_HEADERS], body, 0, len(body), False)

    def put(self, scope: str, key: str, record: Record, *, seen: int) -> None:
        """Keep a completed record with an inline body (others are ignored), read from the
        database while `version` was `seen`."""
        if (not self.live or seen != self.version or record.state is not State.COMPLETED
                or record.body_chunks or record.body_omitted or record.status is None):
            return
        body = record.body or b""
        if len(body) > MAX_ENTRY:
            return
        size = entry_cost(scope, key, body, record.headers)
        if size > self.max_bytes:
            return
        k = (scope, key)
        self._drop(k)
        self._entries[k] = (
            record.expires_at.timestamp() - EXPIRY_MARGIN, time.monotonic() + MAX_AGE, size,
            record.status, tuple(record.headers), body, bytes(record.fingerprint),
            record.lock_token.int, record.expires_at)
        self._unnamed[k] = None
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def forget(self, scope: str, key: str) -> None:
        self.version += 1
        self._drop((scope, key))

    def forget_id(self, ident: str) -> None:
        """Drop the entry a NOTIFY names (md5 of scope and key)."""
        self.version += 1
        for k in self._unnamed:
            name = notify_channel_id(*k)
            self._by_id[name], self._ids[k] = k, name
        self._unnamed.clear()
        named = self._by_id.get(ident)
        if named is not None:
            self._drop(named)

    def set_live(self, live: bool) -> None:
        """On while deletions can be heard; emptied whenever that may have lapsed."""
        self.clear()
        self.live = live and self.max_bytes > 0

    def clear(self) -> None:
        self.version += 1
        self._entries.clear()
        self._by_id.clear()
        self._ids.clear()
        self._unnamed.clear()
        self._bytes = 0

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self._entries.pop(k, None)
        if entry is not None:
            self._bytes -= entry[_SIZE]
            if k in self._unnamed:
                del self._unnamed[k]
            else:
                del self._by_id[self._ids.pop(k)]
