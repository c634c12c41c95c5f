"""`database.sharding: citus` (issue #29): the schema distributed over a Citus cluster.

On the coordinator, after the migrations: the records and chunk tables are distributed by
the key column and colocated (a key's record and its chunks live on one worker), the
small shared tables (installation secret, schema versions) are reference tables, and the
single-key functions are distributed functions whose key argument picks the worker, so a
claim, completion, release or renewal runs on that worker in one local transaction (no
two-phase commit on the request path) and decides times on that worker's clock.

Every step is idempotent: `idemproxy migrate` converts a single-node database that
already holds records (Citus copies them into the shards) and does nothing the second time.

A migration applied to distributed tables runs one statement at a time in sequential
mode: Citus refuses several commands in one prepared statement, and function DDL after
parallel DDL in one transaction.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from proxy.errors import RuntimeFailure

log = logging.getLogger("idemproxy.store")

_KEYS = "idemproxy_keys"
DISTRIBUTED = (_KEYS, "idemproxy_chunks")
REFERENCE = ("idemproxy_installation", "idemproxy_schema")
# Single-key functions, by signature: the key (`p_key`) picks the worker that runs them.
# A migration that adds a single-key function the store calls adds it here (a test in
# tests/test_citus.py checks every one the store calls is distributed).
FUNCTIONS = (
    "idemproxy_claim(text, text, bytea, uuid, float8, float8)",
    "idemproxy_claim2(text, text, bytea, uuid, float8, float8, uuid, bigint)",  # 0009
    "idemproxy_complete(text, text, uuid, integer, bytea, bytea, integer, bigint, boolean,"
    " boolean)",
    "idemproxy_release(text, text, uuid, boolean)",
    "idemproxy_renew(text, text, uuid, float8)",
    "idemproxy_claim2(text, text, bytea, uuid, float8, float8, uuid, bigint)",
)


async def has_citus(conn: Any) -> bool:
    """The citus extension is installed in this database."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')")
    return found


async def is_distributed(conn: Any) -> bool:
    """The records table is a Citus distributed table here."""
    if not await has_citus(conn):
        return False
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = "
        "to_regclass($1))", _KEYS)
    return found


async def check(conn: Any, *, citus: bool) -> None:
    """Refuse `sharding: citus` on a database without Citus; warn when a database whose
    tables Citus distributes is used with `sharding: none` (it works, slower: the
    request path then routes each statement through the coordinator)."""
    if citus and not await has_citus(conn):
        raise RuntimeFailure(
            "database.sharding is citus, but the database has no citus extension: run "
            "CREATE EXTENSION citus on the coordinator and every worker (docs/citus.md), "
            "or set database.sharding: none")
    if not citus and await is_distributed(conn):
        log.warning("the database's tables are distributed by Citus but database.sharding "
                    "is none: set database.sharding: citus (docs/citus.md)")


async def distribute(conn: Any) -> list[str]:
    """Distribute what is not distributed yet, in the caller's transaction (under the
    migration lock); the steps taken, empty when the cluster was already set up."""
    done: list[str] = []
    kinds = {r["t"]: r["kind"] for r in await conn.fetch(
        "SELECT logicalrelid::regclass::text AS t, partmethod AS kind "
        "FROM pg_dist_partition")}
    # Sequential mode: creating shards in parallel then DDL in the same call is refused.
    await conn.execute("SET LOCAL citus.multi_shard_modify_mode TO 'sequential'")
    for i, table in enumerate(DISTRIBUTED):
        if table not in kinds:
            colocate = "default" if i == 0 else _KEYS
            await conn.execute("SELECT create_distributed_table($1, 'key', "
                               "colocate_with => $2)", table, colocate)
            done.append(f"distributed {table}")
    for table in REFERENCE:
        if table not in kinds:
            await conn.execute("SELECT create_reference_table($1)", table)
            done.append(f"reference table {table}")
    have = {r["f"] for r in await conn.fetch(
        "SELECT objid::regprocedure::text AS f FROM pg_dist_object "
        "WHERE classid = 'pg_proc'::regclass AND distribution_argument_index "
        "IS NOT NULL")}
    for fn in FUNCTIONS:
        sig = await conn.fetchval("SELECT to_regprocedure($1)::text", fn)
        if sig is not None and sig not in have:
            await conn.execute("SELECT create_distributed_function($1, 'p_key', "
                               "colocate_with => $2)", fn, _KEYS)
            done.append(f"distributed function {sig}")
    return done


_TOKEN = re.compile(r"""
    (?P<dollar>\$(?P<tag>[A-Za-z_]\w*)?\$)  # a dollar quote opens
  | (?P<quote>')                            # a string literal
  | (?P<line>--)                            # a comment to the end of the line
  | (?P<block>/\*)                          # a block comment
  | (?P<semi>;)
""", re.VERBOSE)


def statements(sql: str) -> list[str]:
    """Split a migration file into its statements (`;` outside quotes, dollar quotes and
    comments); empty ones (comments only) are dropped."""
    out: list[str] = []
    start = pos = 0
    while True:
        m = _TOKEN.search(sql, pos)
        if m is None:
            break
        if m.group("dollar"):
            end = sql.find(m.group("dollar"), m.end())
            pos = len(sql) if end < 0 else end + len(m.group("dollar"))
        elif m.group("quote"):
            end = m.end()
            while True:
                end = sql.find("'", end)
                if end < 0 or sql[end + 1:end + 2] != "'":
                    break
                end += 2  # a doubled quote inside the literal
            pos = len(sql) if end < 0 else end + 1
        elif m.group("line"):
            end = sql.find("\n", m.end())
            pos = len(sql) if end < 0 else end + 1
        elif m.group("block"):
            end = sql.find("*/", m.end())
            pos = len(sql) if end < 0 else end + 2
        else:
            out.append(sql[start:m.end()])
            start = pos = m.end()
    out.append(sql[start:])
    return [s.strip() for s in out if _has_code(s)]


def _has_code(stmt: str) -> bool:
    text = re.sub(r"--[^\n]*", "", stmt)
    return bool(text.strip(" \t\r\n;"))
