"""What every `idemproxy` command shares: its config, the database it may use, the schema
check, the event loop, and a listing printed as JSON or as a table.

Exit codes are the CLI's (proxy/cli.py): errors here are raised, never printed, so each
command ends in one place that maps them to 1 or 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any

from proxy.config import Config, load
from proxy.errors import RuntimeFailure, SchemaNotCurrent, UsageError

CONFIG_ENV = "IDEMPROXY_CONFIG"
# The container image sets this to 0: without a database URL it then refuses to start
# rather than run a private, unshared database that goes with the container.
EMBEDDED_ENV = "IDEMPROXY_EMBEDDED_DATABASE"
OUTPUTS = ("json", "table")


def load_config(args: argparse.Namespace) -> Config:
    """The config a command names: a positional FILE (check-config), else --config, else
    $IDEMPROXY_CONFIG."""
    path = getattr(args, "file", None) or args.config or os.environ.get(CONFIG_ENV)
    if not path:
        raise UsageError(f"no config file: pass --config FILE or set {CONFIG_ENV} "
                         "(config/example.yaml in the repository is a start)")
    return load(path)


def _embedded_allowed() -> bool:
    return os.environ.get(EMBEDDED_ENV, "1").strip().lower() not in ("0", "no", "false",
                                                                       "off")


def require_database(cfg: Config, *, create: bool) -> None:
    """Refuse what would start an embedded PostgreSQL by mistake.

    `create`: the command may create the embedded cluster (serve, migrate). Other
    commands only read or change records, so with no cluster under data_dir they say so
    instead of creating an empty one.
    """
    if cfg.database.url:
        return
    if not _embedded_allowed():
        raise UsageError(
            "no database URL: set IDEMPROXY_DATABASE_URL (or database.url) to the "
            f"PostgreSQL every replica shares, or {EMBEDDED_ENV}=1 to run a private "
            f"embedded one under data_dir ({cfg.data_dir}; replicas do not share it, and "
            "it is lost with the container unless data_dir is a volume)")
    pgdata = Path(cfg.data_dir) / "pgdata"
    if not create and not (pgdata / "PG_VERSION").exists():
        raise RuntimeFailure(
            f"no database: {pgdata} holds no embedded PostgreSQL (data_dir of "
            f"{cfg.source}); run `idemproxy serve` or `idemproxy migrate` with this config "
            "first, or set IDEMPROXY_DATABASE_URL")


async def require_schema(store: Any) -> None:
    """Operations never migrate as a side effect: a newer CLI must not change the schema
    under an older fleet. `idemproxy migrate` (or `serve`) does that on purpose."""
    if not await store.ready():
        raise SchemaNotCurrent("the database schema is missing or older than this "
                               "version; run `idemproxy migrate` first")


@contextlib.asynccontextmanager
async def opened(cfg: Config, *, sealer: bool = False) -> AsyncIterator[Any]:
    """The migrated store for an operation (never created, never migrated here); with
    `sealer`, its encryption keys and installation secret loaded."""
    from proxy.store.open import open_store

    require_database(cfg, create=False)
    async with open_store(cfg) as store:
        await require_schema(store)
        if sealer:
            from proxy.server import open_sealer
            await open_sealer(cfg, store, quiet=True)
        yield store


def run(coro: Awaitable[int]) -> int:
    try:
        import uvloop
        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def known_route(cfg: Config, name: str) -> None:
    """A route name the config does not have is a usage error (exit 2), never an empty
    answer that looks like "no keys"."""
    names = [r.name for r in cfg.routes]
    if name not in names:
        raise UsageError(f"no route named {name!r} in {cfg.source} (its routes: "
                         f"{', '.join(names) or 'none'})")


def emit(rows: Sequence[dict[str, Any]], *, output: str, columns: Sequence[str]) -> None:
    """Print `rows` as a JSON array, or as an aligned table of `columns`."""
    if output == "json":
        print(json.dumps(list(rows), indent=2, default=str))
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    for line in [list(columns), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def deprecated(old: str, new: str) -> None:
    """One line on stderr for a spelling kept for one release."""
    print(f"warning: `idemproxy {old}` is deprecated and goes in the next release; use "
          f"`idemproxy {new}`", file=sys.stderr)
