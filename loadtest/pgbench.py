"""The database ceiling: pgbench running the proxy's own claim and complete statements.

`first`: claim a new key, then complete it with a small stored response (what a first
request costs the database: two round trips, two commits). `first batched`: the same in
batches of `BATCH` (idemproxy_claim_many / idemproxy_complete_many, what the proxy sends
when calls queue for a connection; store/batch.py). `replay`: claim a key that holds a
completed response (one round trip, a read). Clients = the proxy's pool size.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

BATCH = 8  # claims (then completions) per statement in `first_batch_script`

# What the upstream's 201 looks like once stored: header lines and an 83-byte body.
STORED_HEADERS = b"Content-Type: application/json; charset=utf-8\r\nContent-Length: 84\r\n"
STORED_BODY = b'{"id":"ch_000001","object":"charge","amount":2000,"currency":"eur","status":"ok"}  '
REPLAY_SCOPE = "pgbench-replay"  # no ':' in literals: pgbench reads ':name' as a variable

_KEY = ":nonce::text || '-' || :client_id::text || '-' || :n::text"
_FP = "decode('00', 'hex')"


def _hex(b: bytes) -> str:
    return f"decode('{b.hex()}', 'hex')"


def first_script() -> str:
    return (
        "\\set n random(1, 1000000000000)\n"
        f"SELECT lock_token AS tok FROM idemproxy_claim('pgbench-first', {_KEY}, {_FP}, "
        "gen_random_uuid(), 60, 86400) \\gset\n"
        f"SELECT idemproxy_complete('pgbench-first', {_KEY}, :tok, 201, "
        f"{_hex(STORED_HEADERS)}, {_hex(STORED_BODY)}, 0, {len(STORED_BODY)}, false, "
        "false);\n")  # p_notify false: what a default (concurrent: reject) route sends


def first_batch_script(size: int = BATCH) -> str:
    """`size` new keys claimed in one statement, then completed in one: one pgbench
    transaction is `size` first requests."""
    keys = (f"array(SELECT {_KEY} || '-' || g::text FROM generate_series(1, {size}) g)")

    def fill(value: str) -> str:
        return f"array_fill({value}, ARRAY[{size}])"

    scope = fill("'pgbench-first'::text")
    return (
        "\\set n random(1, 1000000000000)\n"
        "SELECT array_agg(lock_token) AS toks FROM idemproxy_claim_many("
        f"{scope}, {keys}, {fill(_FP)}, "
        f"array(SELECT gen_random_uuid() FROM generate_series(1, {size})), "
        f"{fill('60::float8')}, {fill('86400::float8')}) \\gset\n"
        "SELECT count(*) FROM idemproxy_complete_many("
        f"{scope}, {keys}, :toks::uuid[], {fill('201')}, "
        f"{fill(_hex(STORED_HEADERS))}, {fill(_hex(STORED_BODY))}, {fill('0')}, "
        f"{fill(f'{len(STORED_BODY)}::bigint')}, {fill('false')});\n")


def replay_script(nkeys: int) -> str:
    return (
        f"\\set n random(1, {nkeys})\n"
        f"SELECT * FROM idemproxy_claim('{REPLAY_SCOPE}', 'r' || :n::text, {_FP}, "
        "gen_random_uuid(), 60, 86400);\n")


def fill_sql(*, scope: str, prefix: str, count: int) -> str:
    """Completed rows in bulk (INSERT … SELECT generate_series), as the proxy stores them."""
    return (
        "INSERT INTO idemproxy_keys (scope, key, fingerprint, state, lock_token, "
        "expires_at, completed_at, status, headers, body, body_size) "
        f"SELECT '{scope}', '{prefix}' || g, {_FP}, 2, gen_random_uuid(), "
        f"now() + interval '1 day', now(), 201, {_hex(STORED_HEADERS)}, "
        f"{_hex(STORED_BODY)}, {len(STORED_BODY)} FROM generate_series(1, {count}) g "
        "ON CONFLICT DO NOTHING")


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    latency_ms: float
    failed: int

    def as_dict(self) -> dict[str, float]:
        return {"rps": self.tps, "mean_ms": self.latency_ms, "failed": self.failed}


def parse(output: str) -> PgbenchResult:
    tps = re.search(r"^tps = ([\d.]+)", output, re.M)
    lat = re.search(r"^latency average = ([\d.]+) ms", output, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", output, re.M)
    if tps is None or lat is None:
        raise ValueError(f"unexpected pgbench output:\n{output[-2000:]}")
    return PgbenchResult(float(tps.group(1)), float(lat.group(1)),
                         int(failed.group(1)) if failed else 0)


def psql(url: str, sql: str) -> str:
    proc = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-Atqc", sql],
                          capture_output=True, text=True, timeout=1800, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"psql failed: {proc.stderr[-2000:]}")
    return proc.stdout


def run(*, url: str, script: Path, seconds: float, clients: int, nonce: str) -> PgbenchResult:
    argv = ["pgbench", "-n", "-M", "prepared", f"-c{clients}", "-j1",
            f"-T{max(1, round(seconds))}", "-D", f"nonce={nonce}", "-f", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return parse(proc.stdout)
