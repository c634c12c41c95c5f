"""The store: what the flow needs from durable state, and the records it returns.

The only implementation is `PostgresStore` (store/postgres.py); tests of the contract
run against real PostgreSQL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID


class State(enum.IntEnum):
    """A key's state: a claim still running, or a stored response."""

    IN_FLIGHT = 1
    COMPLETED = 2


class ClaimOutcome(enum.IntEnum):
    NEW = 1  # this request owns the key: forward it
    TAKEN_OVER = 2  # a dead claim's lease ended (or the row expired): forward it
    EXISTING = 3  # somebody else's claim or result: replay, conflict or mismatch


@dataclass(frozen=True, slots=True)
class Record:
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


@dataclass(frozen=True, slots=True)
class Claim:
    outcome: ClaimOutcome
    record: Record


@dataclass(frozen=True, slots=True)
class Completion:
    """What a claim's owner stores: status, headers, and the body inline or in chunks."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes | None
    body_chunks: int
    body_size: int
    body_omitted: bool


def encode_headers(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """Headers as `name: value\\r\\n` lines: order and duplicates kept, any bytes safe."""
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode("utf-8", "surrogateescape")


def decode_headers(blob: bytes | None) -> tuple[tuple[str, str], ...]:
    if not blob:
        return ()
    text = blob.decode("utf-8", "surrogateescape")
    return tuple((k, v) for k, _, v in (line.partition(": ") for line in text.split("\r\n")[:-1]))
