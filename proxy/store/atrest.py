"""Operations on data at rest (issue #15): which keys records use, re-encryption under
the primary key, and erasure of one tenant's records.

Re-encryption works in small batches, each its own short transaction over rows it locks
one at a time with SKIP LOCKED, so traffic is never blocked: replays read without locks,
and a row being re-sealed is skipped by nothing but another re-encryption (one record
per lock, and deletes by key rather than ctid: Citus refuses both across shards). A
record is re-sealed whole (headers, inline body, every chunk) in one transaction, so it
is never half under one key and half under another. Fingerprints cannot be re-keyed
(the request is gone): a key stays in use until the records fingerprinted under it expire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.errors import StoredAnswerUnreadable
from proxy.sealing import BODY, CHUNK, HEADERS, SEALED, Sealer, sealed_by
from proxy.store.notify import FORGET_CHANNEL

# The key id in a sealed piece (0x00 0x01 | len | id | ...) or a keyed fingerprint
# (0x01 | len | id | mac); NULL for plaintext / plain SHA-256. CASE keeps the order.
_SEALED_BY = """CASE WHEN headers IS NULL OR substring(headers FROM 1 FOR 2) <> '\\x0001'::bytea
    OR length(headers) < 3 THEN NULL
    ELSE convert_from(substring(headers FROM 4 FOR get_byte(headers, 2)), 'UTF8') END"""
_FP_BY = """CASE WHEN length(fingerprint) IN (0, 1, 2, 32) THEN NULL
    WHEN get_byte(fingerprint, 0) <> 1 THEN NULL
    ELSE convert_from(substring(fingerprint FROM 3 FOR get_byte(fingerprint, 1)), 'UTF8')
    END"""


@dataclass(frozen=True, slots=True)
class KeyUse:
    key_id: str | None  # None: plaintext records / plain fingerprints
    sealed: int  # completed records whose headers and body it sealed
    fingerprints: int  # records (completed or in flight) fingerprinted under it


async def key_usage(store: Any) -> list[KeyUse]:
    """How many records each key (or none) sealed and fingerprinted."""
    async with store.connection() as conn:
        rows = await conn.fetch(f"""
            WITH s AS (SELECT coalesce({_SEALED_BY}, '') AS id, count(*) AS n
                         FROM idemproxy_keys WHERE state = 2 GROUP BY 1),
                 f AS (SELECT coalesce({_FP_BY}, '') AS id, count(*) AS n
                         FROM idemproxy_keys GROUP BY 1)
            SELECT coalesce(s.id, f.id) AS id, coalesce(s.n, 0) AS sealed,
                   coalesce(f.n, 0) AS fps
              FROM s FULL JOIN f ON s.id = f.id ORDER BY 1""")
    return [KeyUse(r["id"] or None, r["sealed"], r["fps"]) for r in rows]


async def reencrypt_batch(store: Any, *, after: tuple[str, str],
                          batch: int = 100) -> tuple[int, tuple[str, str] | None]:
    """Re-seal up to `batch` completed records after `after` (in key order) that the
    primary key did not seal (plaintext ones included); (re-sealed, where to go on), the
    second None when the table is done. A record that cannot be opened is skipped (and
    logged with its key id); `keys usage` still shows its key in use."""
    sealer = store.sealer
    if sealer.primary is None:
        raise ValueError("no encryption keys are configured")
    prefix = SEALED + bytes((len(sealer.primary.id),)) + sealer.primary.id.encode()
    async with store.connection() as conn, conn.transaction():
        rows = await conn.fetch("""
            SELECT scope, key, lock_token,
                   substring(headers FROM 1 FOR $4) IS DISTINCT FROM $3 AS stale
              FROM idemproxy_keys
             WHERE (scope, key) > ($1, $2) AND state = 2 AND headers IS NOT NULL
             ORDER BY scope, key LIMIT $5""",
                                after[0], after[1], prefix, len(prefix), batch)
        done = 0
        for found in rows:
            if not found["stale"]:
                continue
            row = await conn.fetchrow("""
                SELECT scope, key, lock_token, headers, body, body_chunks
                  FROM idemproxy_keys WHERE scope = $1 AND key = $2 AND lock_token = $3
                   AND state = 2 FOR UPDATE SKIP LOCKED""",
                                      found["scope"], found["key"], found["lock_token"])
            if row is None:
                continue  # gone, taken over, or another re-encryption has it
            try:  # a savepoint per record: one that cannot be opened is left as it is
                async with conn.transaction():
                    await _reseal(conn, sealer, row)
                done += 1
            except StoredAnswerUnreadable:
                pass  # logged and counted by the sealer, with its key id
    return done, ((rows[-1]["scope"], rows[-1]["key"]) if len(rows) == batch else None)


async def _reseal(conn: Any, sealer: Sealer, row: Any) -> None:
    where = {"scope": row["scope"], "key": row["key"], "token": row["lock_token"]}
    was_sealed = sealed_by(row["headers"]) is not None

    def again(blob: bytes, kind: bytes, seq: int = 0) -> bytes:
        plain = sealer.open(blob, kind=kind, seq=seq, **where) if was_sealed else blob
        return sealer.seal(plain, kind=kind, seq=seq, **where)

    body = row["body"]
    await conn.execute(
        "UPDATE idemproxy_keys SET headers = $4, body = $5 WHERE scope = $1 AND key = $2 "
        "AND lock_token = $3", row["scope"], row["key"], row["lock_token"],
        again(row["headers"], HEADERS), None if body is None else again(body, BODY))
    for seq in range(row["body_chunks"]):  # one chunk in memory at a time
        data = await conn.fetchval(
            "SELECT data FROM idemproxy_chunks WHERE scope = $1 AND key = $2 "
            "AND lock_token = $3 AND seq = $4", row["scope"], row["key"],
            row["lock_token"], seq)
        if data is not None:
            await conn.execute(
                "UPDATE idemproxy_chunks SET data = $5 WHERE scope = $1 AND key = $2 "
                "AND lock_token = $3 AND seq = $4", row["scope"], row["key"],
                row["lock_token"], seq, again(data, CHUNK, seq))


@dataclass(frozen=True, slots=True)
class Erased:
    """What a tenant's erasure did."""

    deleted: int  # records (and their bodies) deleted
    in_flight: int  # claims still executing, left alone: run the erasure again later


async def erase_tenant(store: Any, tenant: str, *, batch: int = 1000) -> Erased:
    """Delete every completed record (and body) of one tenant, in batches; each deleted
    key is NOTIFYed so every process drops it from its replay cache.

    In-flight claims are left alone (issue #25): deleting one lets the tenant's retry
    execute the request a second time while the first is still running, and loses the
    first's answer. They hold no stored answer yet (only the keyed fingerprint), and are
    counted in `in_flight` so the operator runs the erasure again once they complete. A
    claim whose proxy died stays until a retry takes it over, or the sweeper ends it.
    """
    total = 0
    while True:
        async with store.connection() as conn, conn.transaction():
            # The DELETE re-checks `state = 2` on a row changed meanwhile, so a claim
            # taken over (state back to 1) under our feet is skipped, never deleted.
            # Candidates then a delete by key (not ctid, not FOR UPDATE): Citus-safe.
            n: int = await conn.fetchval("""
                WITH candidates AS (
                    SELECT scope, key FROM idemproxy_keys
                     WHERE split_part(scope, ':', 2) = $1 AND state = 2 LIMIT $2),
                  gone AS (
                    DELETE FROM idemproxy_keys k USING candidates g
                     WHERE k.scope = g.scope AND k.key = g.key AND k.state = 2
                    RETURNING k.scope, k.key),
                  chunks AS (
                    DELETE FROM idemproxy_chunks c USING gone
                     WHERE c.scope = gone.scope AND c.key = gone.key),
                  told AS (  -- as text: Citus cannot keep a void column for the count
                    SELECT pg_notify($3, md5(scope || chr(31) || key))::text FROM gone)
                SELECT (SELECT count(*) FROM gone) + 0 * (SELECT count(*) FROM told)""",
                                        tenant, batch, FORGET_CHANNEL)
        total += n
        if n < batch:
            break
    async with store.connection() as conn:
        # Chunks no record points at any more; an in-flight recording's chunks belong to
        # its claim's row (same lock token) and are kept.
        await conn.execute("""
            DELETE FROM idemproxy_chunks c WHERE split_part(c.scope, ':', 2) = $1
               AND NOT EXISTS (SELECT 1 FROM idemproxy_keys k WHERE k.scope = c.scope
                                  AND k.key = c.key AND k.lock_token = c.lock_token)""",
                           tenant)
        left: int = await conn.fetchval(
            "SELECT count(*) FROM idemproxy_keys WHERE split_part(scope, ':', 2) = $1 "
            "AND state = 1", tenant)
    return Erased(deleted=total, in_flight=left)
