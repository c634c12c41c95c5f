"""The PostgreSQL store. asyncpg lives here and in store/ only.

Every failure of a store call becomes a `StoreError` here, the one boundary (see
store/pool.py `store_error`): `StoreUnavailable` for the connection or a server that is
not a writable primary, `StoreFailed` for an SQL error of any other class. The flow never
sees a driver's exception.
All time decisions (TTL, lease) are made with the database's clock inside SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from uuid import UUID

import asyncpg

from proxy.errors import RuntimeFailure, StoreError, StoreFailed, StoreUnavailable
from proxy.sealing import BODY, CHUNK, HEADERS, DataKey, Sealer, sealed_by
from proxy.store import (
    Beat,
    Claim,
    ClaimOutcome,
    Completion,
    Record,
    State,
    decode_headers,
    encode_headers,
    notify_channel_id,
)
from proxy.store.batch import Batcher
from proxy.store.migrate import SCHEMA_VERSION, current_version
from proxy.store.notify import FORGET_CHANNEL, LISTENER_NAME
from proxy.store.pool import CONNECTION_ERRORS, Pool, store_error
from proxy.store.side import SideConnection
from proxy.store.sightings import Sightings

_CLAIM = "SELECT * FROM idemproxy_claim2($1, $2, $3, $4, $5, $6, $7, $8)"
_CLAIM_MANY = "SELECT * FROM idemproxy_claim2_many($1, $2, $3, $4, $5, $6, $7, $8)"
_COMPLETE = "SELECT idemproxy_complete($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_COMPLETE_QUIETLY = (  # idemproxy_complete without the NOTIFY (store/migrations/0002)
    "UPDATE idemproxy_keys SET state = 2, status = $4, headers = $5, body = $6, "
    "body_chunks = $7, body_size = $8, body_omitted = $9, completed_at = now(), "
    "locked_until = NULL WHERE scope = $1 AND key = $2 AND lock_token = $3 AND state = 1")
_COMPLETE_MANY = (
    "SELECT idemproxy_complete_many AS ok FROM idemproxy_complete_many"
    "($1, $2, $3, $4, $5, $6, $7, $8, $9)")
_RELEASE = "SELECT idemproxy_release($1, $2, $3, $4)"
_RENEW = "SELECT idemproxy_renew($1, $2, $3, $4)"  # citus: on the key's worker (0008)
_NOTIFY = "SELECT pg_notify('idemproxy', $1)"
# Every renewal bumps the heartbeat: a taker's evidence that the owner is alive, whatever
# the database's clock does (migration 0009; idemproxy_renew bumps it too).
_EXTEND = ("UPDATE idemproxy_keys SET locked_until = now() + make_interval(secs => $4), "
           "heartbeat = heartbeat + 1 "
           "WHERE scope = $1 AND key = $2 AND lock_token = $3 AND state = 1")
_CHUNK = ("INSERT INTO idemproxy_chunks (scope, key, lock_token, seq, data) "
          "VALUES ($1, $2, $3, $4, $5)")
# Purges pick candidates, then delete them by key with the condition checked again (a
# row taken over meanwhile is live again): Citus refuses FOR UPDATE across shards and
# ctid, and it is one statement on a single node as before.
_PURGE = """
    WITH candidates AS (
        SELECT scope, key FROM idemproxy_keys WHERE expires_at <= now()
           AND state = 2  -- in flight: only with evidence (_PURGE_DEAD, #25)
         LIMIT $1),
      gone AS (
        DELETE FROM idemproxy_keys k USING candidates g
         WHERE k.scope = g.scope AND k.key = g.key AND k.expires_at <= now()
           AND k.state = 2
        RETURNING k.scope, k.key),
      chunks AS (
        DELETE FROM idemproxy_chunks c USING gone
         WHERE c.scope = gone.scope AND c.key = gone.key)
    SELECT count(*) FROM gone"""
# A chunk belongs to an answer only while its record has the chunk's token and is either
# still being recorded (in flight) or completed with the chunk inside its body_chunks. The
# rest is garbage: a claim taken over, or a recording the store failed under (issue 25: a
# database outage mid-recording completes the key as omitted and left 25 MB of chunks
# until the key expired).
_PURGE_ORPHANS = """
    WITH candidates AS (
        SELECT c.scope, c.key, c.lock_token, c.seq FROM idemproxy_chunks c
         WHERE NOT EXISTS (SELECT 1 FROM idemproxy_keys k WHERE k.scope = c.scope
                              AND k.key = c.key AND k.lock_token = c.lock_token
                              AND (k.state = 1 OR c.seq < k.body_chunks))
         LIMIT $1),
      gone AS (
        DELETE FROM idemproxy_chunks c USING candidates g
         WHERE c.scope = g.scope AND c.key = g.key AND c.lock_token = g.lock_token
           AND c.seq = g.seq
           AND NOT EXISTS (SELECT 1 FROM idemproxy_keys k WHERE k.scope = c.scope
                              AND k.key = c.key AND k.lock_token = c.lock_token
                              AND (k.state = 1 OR c.seq < k.body_chunks))
        RETURNING 1)
    SELECT count(*) FROM gone"""
# In-flight rows past their window whose lease ended on the database's clock: candidates
# only. The sweeper deletes one after it saw the same (token, heartbeat) on it for a whole
# lease of its own clock (store/sweeper.py), so a step of the database's clock alone
# never deletes a live flight (migration 0009).
_DEAD_CLAIMS = ("SELECT scope, key, lock_token, heartbeat FROM idemproxy_keys "
                "WHERE state = 1 AND expires_at <= now() AND locked_until <= now() LIMIT $1")
_PURGE_DEAD = """
    WITH candidates AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bigint[]) AS d(s, k, t, b)),
      gone AS (
        DELETE FROM idemproxy_keys k USING candidates d
         WHERE k.scope = d.s AND k.key = d.k AND k.lock_token = d.t AND k.heartbeat = d.b
           AND k.state = 1 AND k.locked_until <= now() AND k.expires_at <= now()
        RETURNING k.scope, k.key, k.lock_token),
      chunks AS (
        DELETE FROM idemproxy_chunks c USING gone
         WHERE c.scope = gone.scope AND c.key = gone.key AND c.lock_token = gone.lock_token)
    SELECT count(*) FROM gone"""
_READ_CHUNKS_FROM = ("SELECT seq, data FROM idemproxy_chunks WHERE scope = $1 AND key = $2 "
                     "AND lock_token = $3 AND seq >= $4 ORDER BY seq LIMIT $5")
# Chunk rows one read of a streamed body fetches (store/sizes CHUNK each: 1 MiB), on a
# connection taken for that one statement and given back before a byte goes out.
READ_AHEAD = 4


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Whatever the driver raises in the block leaves it as a StoreError."""
    try:
        yield
    except Exception as exc:
        err = store_error(exc)
        if err is exc:
            raise
        raise err from exc


class PostgresStore:
    """Claims, completions and stored responses in PostgreSQL."""

    def __init__(self, pool: Pool, *, url: str, timeout: float,
                 listen_url: str | None = None, citus: bool = False,
                 observe: Callable[[str, float, float], None] | None = None,
                 observe_batch: Callable[[str, int], None] | None = None) -> None:
        self.pool = pool
        self.url = url
        # Where LISTEN goes: a direct connection (a transaction-mode pooler cannot carry a
        # session's LISTEN); None when there is none (waiters poll, replay cache off).
        self.listen_url = listen_url
        self.timeout = timeout
        # A Citus coordinator (database.sharding: citus, store/citus.py): single-key calls
        # go to the key's worker as distributed functions, and NOTIFY is sent here, where
        # the listeners are (a function's pg_notify would fire on the worker).
        self.citus = citus
        # each statement's (op, start, end) in perf_counter seconds (proxy/observe.py)
        self._observe = observe or (lambda op, start, end: None)
        self._sealer: Sealer | None = None  # load_sealer(): after migrations, before traffic
        # Under load, claims (and quiet completions) that arrive while one of their kind
        # is running share the next statement and its commit (store/batch.py). Not on
        # Citus: a batch spans workers, so it would run on the coordinator with two-phase
        # commit, decide times on the coordinator's clock, and fail whole when one worker
        # is down; each call runs alone on its key's worker instead.
        alone = {"max_batch": 1, "limit": pool.get_max_size()} if citus else {}
        self._claims: Batcher[_ClaimArgs, Any] = Batcher(
            pool, op="claim", one=_claim_one, many=_claim_many, order=_scope_key,
            observe=self._observe, observe_batch=observe_batch or _ignore, **alone)
        self._completions: Batcher[_CompleteArgs, bool] = Batcher(
            pool, op="complete", one=_complete_delegated if citus else _complete_one,
            many=_complete_many, order=_scope_key, observe=self._observe,
            observe_batch=observe_batch or _ignore, **alone)

    @classmethod
    async def connect(cls, url: str, *, min_size: int = 2, max_size: int = 10,
                      timeout: float = 5.0, transaction_pooler: bool = False,
                      listen_url: str | None = None, citus: bool = False,
                      observe: Callable[[str, float, float], None] | None = None,
                      observe_batch: Callable[[str, int], None] | None = None
                      ) -> PostgresStore:
        """A store on `url`. `transaction_pooler`: `url` is a transaction-mode pooler, so
        no session state (store/unnamed.py) and LISTEN only on `listen_url`; otherwise
        LISTEN uses `listen_url` or, by default, `url`."""
        pool = Pool(url, min_size=min_size, max_size=max_size, timeout=timeout,
                    transaction_pooler=transaction_pooler)
        with guard():
            try:
                await pool.start()
            except BaseException:
                await pool.close()
                raise
        return cls(pool, url=url, timeout=timeout,
                   listen_url=listen_url or (None if transaction_pooler else url),
                   citus=citus, observe=observe, observe_batch=observe_batch)

    async def close(self) -> None:
        await self._claims.close()
        await self._completions.close()
        with contextlib.suppress(*CONNECTION_ERRORS):
            await asyncio.wait_for(self.pool.close(), timeout=self.timeout)

    async def _call(self, op: str, method: str, query: str, *args: Any) -> Any:
        """One statement on a pooled connection. Written out rather than with a context
        manager: this runs once per replay and twice per first request."""
        start = time.perf_counter()
        pool = self.pool
        conn = pool.take_nowait()
        try:
            if conn is None:
                conn = await pool.acquire()
            # the connection's command_timeout bounds the statement
            result = await getattr(conn, method)(query, *args)
        except BaseException as exc:
            err = store_error(exc) if conn is None else pool.release_after(conn, exc)
            if err is exc:
                raise
            raise err from exc
        finally:
            self._observe(op, start, time.perf_counter())
        pool.release(conn)
        return result

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection for a block (operations, migrations, cursors); any failure
        in it becomes a StoreError, and the connection is dropped."""
        with guard():
            async with self.pool.connection() as conn:
                yield conn

    async def claim(self, *, scope: str, key: str, fingerprint: bytes, token: UUID,
                    lease: float, ttl: float, seen: Beat | None = None) -> Claim:
        """Claim the key for `token`, or return the row that holds it. One round trip,
        shared with the other claims queued behind a running one (store/batch.py).

        An in-flight row is taken over (or replaced, past its window) only when its lease
        ended on the database's clock and it still shows `seen`: the (token, heartbeat)
        the caller saw on it a whole lease ago by its own clock (proxy/store/sightings.py)."""
        row = await self._claims.run((scope, key, fingerprint, token, lease, ttl,
                                      seen and seen.token, seen and seen.heartbeat))
        headers, body, sealed = row["headers"], row["body"], False
        if headers is not None and sealed_by(headers) is not None:
            # Opened here, before any decision: a record that cannot be opened raises
            # StoredAnswerUnreadable and is never treated as missing (proxy/sealing.py).
            sealed, where = True, {"scope": scope, "key": key, "token": row["lock_token"]}
            headers = self.sealer.open(headers, kind=HEADERS, **where)
            if body is not None:
                body = self.sealer.open(body, kind=BODY, **where)
        return Claim(_OUTCOMES[row["outcome"]], Record(
            _STATES[row["state"]], bytes(row["fingerprint"]), row["lock_token"],
            row["expires_at"], row["status"], decode_headers(headers), body,
            row["body_chunks"], row["body_size"], row["body_omitted"], sealed,
            row["heartbeat"]))

    async def complete(self, *, scope: str, key: str, token: UUID, done: Completion,
                       notify: bool) -> bool:
        """Store the response if `token` still owns the claim; False if it was taken over.

        `notify` wakes waiters on every replica (NOTIFY serialises commits cluster-wide,
        so only routes that can have waiters ask for it)."""
        headers, body = encode_headers(done.headers), done.body
        sealer = self._sealer
        # Headers are sealed always, even none: they mark the record as sealed.
        if sealer is not None and sealer.encrypting:
            headers = sealer.seal(headers, kind=HEADERS, scope=scope, key=key, token=token)
            if body is not None:
                body = sealer.seal(body, kind=BODY, scope=scope, key=key, token=token)
        args: _CompleteArgs = (scope, key, token, done.status, headers, body,
                               done.body_chunks, done.body_size, done.body_omitted)
        if notify:
            ok: bool = await self._call("complete", "fetchval", _COMPLETE, *args,
                                        not self.citus)
            if ok and self.citus:
                await self._call("complete", "execute", _NOTIFY, notify_channel_id(scope, key))
            return ok
        return await self._completions.run(args)

    async def release(self, *, scope: str, key: str, token: UUID, notify: bool) -> bool:
        ok: bool = await self._call("release", "fetchval", _RELEASE, scope, key, token,
                                    notify and not self.citus)
        if ok and notify and self.citus:
            await self._call("release", "execute", _NOTIFY, notify_channel_id(scope, key))
        return ok

    async def extend(self, *, scope: str, key: str, token: UUID, lease: float) -> bool:
        """Renew a live claim's lease (database clock); False if it is no longer ours."""
        if self.citus:  # on the key's worker: the clock that set the lease
            renewed: bool = await self._call("extend", "fetchval", _RENEW, scope, key, token,
                                             lease)
            return renewed
        status: str = await self._call("extend", "execute", _EXTEND, scope, key, token, lease)
        return status == "UPDATE 1"

    def side(self) -> SideConnection:
        """A connection of its own (opened on first use) for another thread's event loop:
        lease renewals that a stalled main loop cannot delay (proxy/flow/leases.py)."""
        return SideConnection(self.url, timeout=self.timeout,
                              connect_args=self.pool.connect_args)

    async def write_chunk(self, *, scope: str, key: str, token: UUID, seq: int,
                          data: bytes) -> None:
        if self._sealer is not None:
            data = self._sealer.seal(data, kind=CHUNK, scope=scope, key=key, token=token,
                                     seq=seq)
        await self._call("chunk", "execute", _CHUNK, scope, key, token, seq, data)

    async def delete_chunks(self, *, scope: str, key: str, token: UUID) -> None:
        await self._call("chunk", "execute", "DELETE FROM idemproxy_chunks WHERE scope = $1 "
                         "AND key = $2 AND lock_token = $3", scope, key, token)

    async def read_chunks(self, *, scope: str, key: str, token: UUID, sealed: bool = False,
                          start: int = 0) -> AsyncIterator[bytes]:
        """Stream a body's chunks in order, READ_AHEAD rows per statement: bounded memory
        for any size. No connection (and no transaction) is held while the caller writes
        them out: a client that reads slowly, or not at all, must not hold the pool
        (issue #25: `pool_max` stalled replays made every guarded request 503). A
        completed record's chunks never change, so reading them in several statements
        reads one body; one deleted meanwhile shows as a gap or a short body (StoreFailed
        here, or the replay's size check). A sealed record's chunks are opened as they
        come (StoredAnswerUnreadable). From row `start` on (a client caught up mid-body).
        """
        seq = start
        while True:
            rows = await self._call("chunks", "fetch", _READ_CHUNKS_FROM, scope, key, token,
                                    seq, READ_AHEAD)
            for row in rows:
                if row["seq"] != seq:
                    raise StoreFailed(f"stored body chunk {seq} is missing")
                data = row["data"]
                if sealed:
                    data = self.sealer.open(data, kind=CHUNK, scope=scope, key=key,
                                            token=token, seq=seq)
                seq += 1
                yield data
            if len(rows) < READ_AHEAD:
                return

    @property
    def sealer(self) -> Sealer:
        """Seals and opens stored pieces; keys the tenant, fingerprint and log hashes."""
        if self._sealer is None:
            raise RuntimeError("PostgresStore.load_sealer() was not called")
        return self._sealer

    async def load_sealer(self, *, keys: tuple[DataKey, ...],
                          on_unreadable: Callable[[str], None] | None = None) -> Sealer:
        """Build the sealer from `keys` and the installation secret (migration 0006)."""
        secret = await self._call("admin", "fetchval",
                                  "SELECT secret FROM idemproxy_installation")
        self._sealer = Sealer(keys=keys, installation_secret=bytes(secret),
                              on_unreadable=on_unreadable)
        return self._sealer

    async def sweep(self, *, sightings: Sightings | None = None, lease: float = 0.0) -> int:
        """One sweeper pass (store/sweeper.py); the expired records deleted. `sightings`,
        `lease`: the running sweeper's, to delete dead claims past their window."""
        from proxy.store.sweeper import sweep_once

        return await sweep_once(self, sightings=sightings, lease=lease)

    async def migrate(self) -> list[str]:
        """Apply missing migrations (under a transaction-scoped advisory lock, so through
        a transaction-mode pooler too); the names applied."""
        from proxy.store.migrate import migrate

        try:
            async with self.connection() as conn:
                applied: list[str] = await migrate(conn, citus=self.citus)
                return applied
        except StoreError as exc:  # database.sharding refused (store/citus.py): as it is
            if isinstance(exc.__cause__, RuntimeFailure):
                raise exc.__cause__ from None
            raise

    async def clock_offset(self) -> float:
        """Database clock minus ours, so time buckets follow the database's clock."""
        db_now: float = await self._call("clock", "fetchval",
                                         "SELECT extract(epoch FROM clock_timestamp())")
        return float(db_now) - time.time()

    async def ready(self) -> bool:
        """Reachable and migrated to the version this code expects."""
        try:
            async with self.connection() as conn:
                return await current_version(conn) >= SCHEMA_VERSION
        except StoreError:
            return False

    # --- operations (admin API, CLI, sweeper) ---

    async def show(self, *, scope: str, key: str) -> dict[str, object] | None:
        row = await self._call("admin", "fetchrow", """
            SELECT scope, key, state, status, created_at, completed_at, expires_at,
                   locked_until, body_size, body_omitted, takeovers,
                   expires_at <= now() AS expired
              FROM idemproxy_keys WHERE scope = $1 AND key = $2""", scope, key)
        return _admin_row(row) if row else None

    async def delete(self, *, scope: str, key: str) -> bool:
        """Delete a key's record (and body) so its next request executes again; at commit
        every replica is told to drop it from its replay cache (proxy/flow/cache.py)."""
        async with self.connection() as conn, conn.transaction():
            n: int = await conn.fetchval("""
                WITH d AS (DELETE FROM idemproxy_keys WHERE scope = $1 AND key = $2
                           RETURNING 1),
                     c AS (DELETE FROM idemproxy_chunks WHERE scope = $1 AND key = $2)
                SELECT count(*) FROM d""", scope, key)
            if n:
                await conn.execute("SELECT pg_notify($1, $2)", FORGET_CHANNEL,
                                   notify_channel_id(scope, key))
        return n > 0

    async def force_release(self, *, scope: str, key: str) -> bool:
        """Release an in-flight claim whatever its token (a stuck claim)."""
        token = await self._call("admin", "fetchval", """
            SELECT lock_token FROM idemproxy_keys WHERE scope = $1 AND key = $2 AND state = 1
            """, scope, key)
        return token is not None and await self.release(scope=scope, key=key, token=token,
                                                        notify=True)

    async def in_flight(self, *, limit: int = 100) -> list[dict[str, object]]:
        rows = await self._call("admin", "fetch", """
            SELECT scope, key, state, status, created_at, completed_at, expires_at,
                   locked_until, body_size, body_omitted, takeovers,
                   expires_at <= now() AS expired
              FROM idemproxy_keys WHERE state = 1 ORDER BY created_at LIMIT $1""", limit)
        return [_admin_row(r) for r in rows]

    async def list_keys(self, *, limit: int, route: str | None = None,
                        state: State | None = None, newer_than: float | None = None,
                        older_than: float | None = None) -> list[dict[str, object]]:
        """Stored keys and claims, newest first, at most `limit` (the CLI's `keys list`).

        `route` keeps one route's scopes (`ROUTE:TENANT`); `newer_than`/`older_than` are
        ages in seconds on the database's clock. Expired rows the sweeper has not deleted
        yet are listed too, marked `expired`. No index serves this order: it reads the
        table once (an operator's command, bounded by `limit`, never on the request path).
        """
        rows = await self._call("admin", "fetch", """
            SELECT scope, key, state, status, created_at, completed_at, expires_at,
                   locked_until, body_size, body_omitted, takeovers,
                   expires_at <= now() AS expired
              FROM idemproxy_keys
             WHERE ($2::text IS NULL OR left(scope, length($2) + 1) = $2 || ':')
               AND ($3::smallint IS NULL OR state = $3)
               AND ($4::float8 IS NULL OR created_at >= now() - make_interval(secs => $4))
               AND ($5::float8 IS NULL OR created_at <= now() - make_interval(secs => $5))
             ORDER BY created_at DESC, scope, key LIMIT $1""",
            limit, route, None if state is None else int(state), newer_than, older_than)
        return [_admin_row(r) for r in rows]

    async def purge(self, *, batch: int = 1000, conn: Any = None) -> int:
        """Delete one batch of expired rows (and their bodies); the number of rows gone.
        On `conn` (the sweeper's, inside its locked transaction) or a pooled one."""
        return await self._purge(_PURGE, batch, conn)

    async def purge_orphans(self, *, batch: int = 1000, conn: Any = None) -> int:
        """Delete one batch of chunks no answer points at (left by a claim that was taken
        over, or by a recording the store failed under); the number of chunks gone."""
        return await self._purge(_PURGE_ORPHANS, batch, conn)

    async def dead_claims(self, *, batch: int, conn: Any) -> list[tuple[str, str, Beat]]:
        """In-flight rows past their window whose lease ended on the database's clock."""
        with guard():
            rows = await conn.fetch(_DEAD_CLAIMS, batch)
        return [(r["scope"], r["key"], Beat(r["lock_token"], r["heartbeat"])) for r in rows]

    async def purge_dead(self, *, dead: list[tuple[str, str, Beat]], conn: Any) -> int:
        """Delete those of `dead` that still show the same token and heartbeat."""
        with guard():
            n: int = await conn.fetchval(
                _PURGE_DEAD, [d[0] for d in dead], [d[1] for d in dead],
                [d[2].token for d in dead], [d[2].heartbeat for d in dead])
        return n

    async def _purge(self, query: str, batch: int, conn: Any) -> int:
        if conn is None:
            n: int = await self._call("purge", "fetchval", query, batch)
            return n
        with guard():
            n = await conn.fetchval(query, batch)
            return n

    async def acquire_listener(self) -> asyncpg.Connection:
        """A connection for LISTEN, on `listen_url` (a session of its own)."""
        if self.listen_url is None:
            raise StoreUnavailable("no database.listen_url: LISTEN is off behind a "
                                   "transaction-mode pooler")
        with guard():
            conn: asyncpg.Connection = await asyncpg.connect(
                self.listen_url, timeout=self.timeout,
                server_settings={"application_name": LISTENER_NAME})  # named for operators
            return conn


_ClaimArgs = tuple[str, str, bytes, UUID, float, float, UUID | None, int | None]
# The enum members by value: a dict lookup, where calling the enum costs ~15 times more.
_OUTCOMES = {o.value: o for o in ClaimOutcome}
_STATES = {s.value: s for s in State}
_CompleteArgs = tuple[str, str, UUID, int, bytes, bytes | None, int, int, bool]


def _ignore(op: str, calls: int) -> None:
    pass


def _scope_key(args: tuple[Any, ...]) -> tuple[str, str]:
    return args[0], args[1]


async def _claim_one(conn: Any, args: _ClaimArgs) -> Any:
    return await conn.fetchrow(_CLAIM, *args)


async def _claim_many(conn: Any, batch: list[_ClaimArgs]) -> list[Any]:
    rows: list[Any] = await conn.fetch(_CLAIM_MANY, *map(list, zip(*batch, strict=True)))
    return rows


async def _complete_one(conn: Any, args: _CompleteArgs) -> bool:
    # The same compare-and-set as idemproxy_complete, without its call overhead (~6 % of
    # a first request's database instructions, measured with callgrind).
    status: str = await conn.execute(_COMPLETE_QUIETLY, *args)
    return status == "UPDATE 1"


async def _complete_delegated(conn: Any, args: _CompleteArgs) -> bool:
    # Citus: the function runs on the key's worker, completed_at on the worker's clock.
    ok: bool = await conn.fetchval(_COMPLETE, *args, False)
    return ok


async def _complete_many(conn: Any, batch: list[_CompleteArgs]) -> list[bool]:
    rows = await conn.fetch(_COMPLETE_MANY, *map(list, zip(*batch, strict=True)))
    return [row["ok"] for row in rows]


def _admin_row(row: Any) -> dict[str, object]:
    doc: dict[str, Any] = dict(row)
    doc["state"] = State(doc["state"]).name.lower()
    for k in ("created_at", "completed_at", "expires_at", "locked_until"):
        doc[k] = doc[k].isoformat() if doc[k] else None
    return doc
