"""The operator's look at single keys (`idemproxy keys show`) and the records of a retired
encryption key (`idemproxy encryption-keys purge`).

A stored answer is opened with the store's sealer exactly as a replay opens it: a record
that cannot be opened raises StoredAnswerUnreadable, never reads as missing.
"""

from __future__ import annotations

from typing import Any

from proxy.sealing import BODY, HEADERS, sealed_by
from proxy.store import State, decode_headers
from proxy.store.atrest import _FP_BY, _SEALED_BY
from proxy.store.notify import FORGET_CHANNEL

Headers = tuple[tuple[str, str], ...]


async def scopes_holding(store: Any, *, route: str, key: str) -> list[str]:
    """The scopes (`ROUTE:TENANT`) of `route` that hold `key`, in order."""
    async with store.connection() as conn:
        rows = await conn.fetch(
            "SELECT scope FROM idemproxy_keys WHERE key = $2 "
            "AND left(scope, length($1) + 1) = $1 || ':' ORDER BY scope", route, key)
    return [r["scope"] for r in rows]


async def stored_answer(store: Any, *, scope: str, key: str,
                        with_body: bool) -> tuple[Headers, bytes | None] | None:
    """A completed key's stored headers, and (`with_body`) its whole body; None while
    the key is in flight or gone. The body is read into memory: for one key, on request."""
    async with store.connection() as conn:
        row = await conn.fetchrow(
            "SELECT headers, body, lock_token, body_chunks FROM idemproxy_keys "
            "WHERE scope = $1 AND key = $2 AND state = $3", scope, key,
            int(State.COMPLETED))
    if row is None or row["headers"] is None:
        return None
    headers, body, token = row["headers"], row["body"], row["lock_token"]
    sealed = sealed_by(headers) is not None
    if sealed:
        where = {"scope": scope, "key": key, "token": token}
        headers = store.sealer.open(headers, kind=HEADERS, **where)
        if body is not None and with_body:
            body = store.sealer.open(body, kind=BODY, **where)
    if not with_body:
        return decode_headers(headers), None
    if body is None and row["body_chunks"]:
        parts = [c async for c in store.read_chunks(scope=scope, key=key, token=token,
                                                    sealed=sealed)]
        body = b"".join(parts)
    return decode_headers(headers), bytes(body or b"")


async def purge_key_id(store: Any, key_id: str, *, batch: int = 1000) -> int:
    """Delete every completed record sealed or fingerprinted under `key_id` (and its
    body), NOTIFYing each so replay caches drop it; the number deleted. In-flight claims
    are left alone: deleting one would let its retry run a second time."""
    total = 0
    while True:
        async with store.connection() as conn, conn.transaction():
            # Candidates, then a delete by key re-checking the state (no ctid, no FOR
            # UPDATE: the same on one PostgreSQL and on Citus, as store/atrest.py erases).
            n: int = await conn.fetchval(f"""
                WITH candidates AS (
                    SELECT scope, key FROM idemproxy_keys
                     WHERE state = 2 AND ({_SEALED_BY} = $1 OR {_FP_BY} = $1) LIMIT $2),
                  gone AS (
                    DELETE FROM idemproxy_keys k USING candidates g
                     WHERE k.scope = g.scope AND k.key = g.key AND k.state = 2
                    RETURNING k.scope, k.key, k.lock_token),
                  chunks AS (
                    DELETE FROM idemproxy_chunks c USING gone
                     WHERE c.scope = gone.scope AND c.key = gone.key
                       AND c.lock_token = gone.lock_token),
                  told AS (  -- as text: Citus cannot keep a void column for the count
                    SELECT pg_notify($3, md5(scope || chr(31) || key))::text FROM gone)
                SELECT (SELECT count(*) FROM gone) + 0 * (SELECT count(*) FROM told)""",
                                    key_id, batch, FORGET_CHANNEL)
        total += n
        if n < batch:
            return total
