"""The store: what the flow needs from durable state, and the records it returns.

The protocols are split by who uses them: `FlowStore` (the flow), `AdminStore` (the admin
API and the CLI), `RuntimeStore` (a process's life); `Store` is what `create_app` takes
and `OpenedStore` what `open_store` (store/open.py, the one place a backend is chosen)
yields. None names a driver type. The only implementation is `PostgresStore`
(store/postgres.py), and tests of the contract run against real PostgreSQL. Every failure
a store method raises is an `errors.StoreError`.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import TYPE_CHECKING, NamedTuple, Protocol
from uuid import UUID

from proxy.sealing import DataKey, Sealer

if TYPE_CHECKING:  # store/sightings.py uses Beat from here
    from proxy.store.sightings import Sightings


class State(enum.IntEnum):
    """A key's state: a claim still running, or a stored response."""

    IN_FLIGHT = 1
    COMPLETED = 2


class ClaimOutcome(enum.IntEnum):
    NEW = 1  # this request owns the key: forward it
    TAKEN_OVER = 2  # a dead claim's lease ended (or the row expired): forward it
    EXISTING = 3  # somebody else's claim or result: replay, conflict or mismatch


# Records, claims and completions are NamedTuples, immutable as frozen dataclasses are,
# but built in a fraction of the time (a frozen dataclass's __init__ sets each field
# through object.__setattr__: ~7 µs for a Record here, a few are made per request).

class Record(NamedTuple):
    """A key's row as the claim found it."""

    state: State
    fingerprint: bytes
    lock_token: UUID
    expires_at: datetime
    status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None  # inline body; None when in chunks or omitted
    body_chunks: int = 0
    body_size: int = 0
    body_omitted: bool = False
    sealed: bool = False  # stored sealed (proxy/sealing.py): its chunks are opened on read
    heartbeat: int = 0  # bumped by every renewal of an in-flight claim (migration 0009)

    @property
    def beat(self) -> Beat:
        """The claim's (token, heartbeat): what a sighting of it remembers."""
        return Beat(self.lock_token, self.heartbeat)


class Beat(NamedTuple):
    """An in-flight claim as seen once: its token and heartbeat. Shown back to the store
    a whole lease later (by the caller's own clock), unchanged, it is the evidence that
    lets a claim whose lease ended be taken over (proxy/store/sightings.py)."""

    token: UUID
    heartbeat: int


class Claim(NamedTuple):
    outcome: ClaimOutcome
    record: Record


class Completion(NamedTuple):
    """What a claim's owner stores: status, headers, and the body inline or in chunks."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    body_chunks: int
    body_size: int
    body_omitted: bool


def notify_channel_id(scope: str, key: str) -> str:
    """The NOTIFY payload for a key: md5 as in SQL, so no raw key crosses the channel."""
    return hashlib.md5(f"{scope}\x1f{key}".encode("utf-8", "surrogateescape")).hexdigest()


def encode_headers(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """Headers as `name: value\\r\\n` lines: order and duplicates kept, any bytes safe."""
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode("utf-8", "surrogateescape")


def decode_headers(blob: bytes | None) -> tuple[tuple[str, str], ...]:
    if not blob:
        return ()
    text = blob.decode("utf-8", "surrogateescape")
    return tuple((k, v) for k, _, v in (line.partition(": ") for line in text.split("\r\n")[:-1]))


class PoolSizes(Protocol):
    """What the pool gauges read (proxy/metrics.py)."""

    def get_size(self) -> int: ...
    def get_idle_size(self) -> int: ...
    def get_max_size(self) -> int: ...


class SideStore(Protocol):
    """A connection of its own for another thread's event loop (lease renewals)."""

    async def extend(self, *, scope: str, key: str, token: UUID, lease: float) -> bool: ...
    async def close(self) -> None: ...


class FlowStore(Protocol):
    """What the flow needs: claims, their answers and bodies, and the LISTEN connection
    that wakes waiters (opaque outside store/: store/notify.py drives it)."""

    @property
    def listen_url(self) -> str | None: ...  # None: no LISTEN (waiters poll, no cache)

    async def claim(self, *, scope: str, key: str, fingerprint: bytes, token: UUID,
                    lease: float, ttl: float, seen: Beat | None = None) -> Claim: ...
    async def complete(self, *, scope: str, key: str, token: UUID, done: Completion,
                       notify: bool) -> bool: ...
    async def release(self, *, scope: str, key: str, token: UUID, notify: bool) -> bool: ...
    async def extend(self, *, scope: str, key: str, token: UUID, lease: float) -> bool: ...
    def side(self) -> SideStore: ...
    async def write_chunk(self, *, scope: str, key: str, token: UUID, seq: int,
                          data: bytes) -> None: ...
    async def delete_chunks(self, *, scope: str, key: str, token: UUID) -> None: ...
    def read_chunks(self, *, scope: str, key: str, token: UUID, sealed: bool = False,
                    start: int = 0) -> AsyncIterator[bytes]: ...
    async def clock_offset(self) -> float: ...
    async def acquire_listener(self) -> object: ...


class AdminStore(Protocol):
    """What the admin API and the CLI's key commands need."""

    @property
    def pool(self) -> PoolSizes: ...
    async def ready(self) -> bool: ...
    async def show(self, *, scope: str, key: str) -> dict[str, object] | None: ...
    async def delete(self, *, scope: str, key: str) -> bool: ...
    async def force_release(self, *, scope: str, key: str) -> bool: ...
    async def in_flight(self, *, limit: int = 100) -> list[dict[str, object]]: ...
    async def list_keys(self, *, limit: int, route: str | None = None,
                        state: State | None = None, newer_than: float | None = None,
                        older_than: float | None = None) -> list[dict[str, object]]: ...


class RuntimeStore(Protocol):
    """What a process's life needs: migrations, readiness, the sealer, sweeping."""

    @property
    def url(self) -> str: ...  # where the supervisor's workers open the same store

    @property
    def sealer(self) -> Sealer: ...  # seals pieces, keys hashes (proxy/sealing.py)
    async def load_sealer(self, *, keys: tuple[DataKey, ...],
                          on_unreadable: Callable[[str], None] | None = None) -> Sealer: ...
    async def migrate(self) -> list[str]: ...
    async def ready(self) -> bool: ...
    async def sweep(self, *, sightings: Sightings | None = None,
                    lease: float = 0.0) -> int: ...  # one pass: the records deleted


class Store(FlowStore, AdminStore, Protocol):
    """What `create_app` assembles the proxy on: the flow's and the admin API's store,
    and the sealer the runtime loaded into it (handed to the flow as `Deps.sealer`)."""

    @property
    def sealer(self) -> Sealer: ...


class OpenedStore(Store, RuntimeStore, Protocol):
    """What `open_store` yields: every protocol above, whatever the backend."""
