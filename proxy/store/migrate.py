"""Versioned schema migrations, applied under an advisory lock.

Ten replicas starting at once serialise on the lock; each applies only what is missing.
Files are `migrations/NNNN_name.sql`, applied in order, all that are missing in one
transaction: all or none. The lock is transaction-scoped (`pg_advisory_xact_lock`): a
session lock would not survive a transaction-mode pooler, which may run the unlock on
another server connection than the lock. (It still excludes an older replica holding
the session-level lock of the same key.)

With `citus` (database.sharding), the coordinator then distributes the tables and the
single-key functions (store/citus.py); a migration applied to tables already distributed
runs statement by statement, in Citus's sequential mode.
"""

from __future__ import annotations

import re
from importlib import resources

import asyncpg

from proxy.store import citus as citus_layout

_LOCK_ID = 0x1DE3_9A0C  # advisory lock key for migrations
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every bundled migration, in order."""
    found = []
    for entry in resources.files("proxy.store").joinpath("migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


SCHEMA_VERSION = migrations()[-1][0]


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('idemproxy_schema') IS NOT NULL")
    if not exists:
        return 0
    version: int | None = await conn.fetchval("SELECT max(version) FROM idemproxy_schema")
    return version or 0


async def migrate(conn: asyncpg.Connection, *, citus: bool = False) -> list[str]:
    """Apply every missing migration; return the names applied (empty when current).
    `citus`: the database is a Citus coordinator; distribute what is not yet."""
    await citus_layout.check(conn, citus=citus)
    distributed = citus and await citus_layout.is_distributed(conn)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
        await conn.execute("""CREATE TABLE IF NOT EXISTS idemproxy_schema (
            version integer PRIMARY KEY, name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now())""")
        have = await current_version(conn)
        applied: list[str] = []
        for version, name, sql in migrations():
            if version <= have:
                continue
            if distributed:
                await conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
                for statement in citus_layout.statements(sql):
                    await conn.execute(statement)
            else:
                await conn.execute(sql)
            await conn.execute("INSERT INTO idemproxy_schema (version, name) "
                               "VALUES ($1, $2)", version, name)
            applied.append(name)
    if citus:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_ID)
            applied += await citus_layout.distribute(conn)
    return applied
