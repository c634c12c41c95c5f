"""The `idemproxy` command: serve, check-config, migrate, keys, purge.

Exit codes: 0 success, 1 runtime failure (database unreachable, ...), 2 bad usage or
config. Errors are one clear line each, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from proxy import logs
from proxy.config import Config, load
from proxy.errors import ConfigError, StoreUnavailable

log = logging.getLogger("idemproxy")

DEFAULT_CONFIG = "config/example.yaml"


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("IDEMPROXY_CONFIG") or DEFAULT_CONFIG
    return load(path)


@contextlib.asynccontextmanager
async def open_store(cfg: Config, *, wait: float = 0.0,
                     observe: Callable[[str, float], None] | None = None,
                     observe_batch: Callable[[str, int], None] | None = None
                     ) -> AsyncIterator[Any]:
    """The store for `cfg`: its database URL, or an embedded server under data_dir."""
    from proxy.embedded import embedded_postgres
    from proxy.store.postgres import PostgresStore

    with contextlib.ExitStack() as stack:
        url = cfg.database.url or stack.enter_context(embedded_postgres(cfg.data_dir))
        store = await _connect_retrying(lambda: PostgresStore.connect(
            url, min_size=cfg.database.pool_min, max_size=cfg.database.pool_max,
            timeout=cfg.database.timeout, observe=observe, observe_batch=observe_batch),
            wait=wait)
        try:
            yield store
        finally:
            await store.close()


async def _connect_retrying(connect: Callable[[], Awaitable[Any]], *, wait: float) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            return await connect()
        except StoreUnavailable as exc:
            if loop.time() >= deadline:
                raise
            log.warning("database not reachable yet, retrying: %s", exc)
            await asyncio.sleep(1)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.file)
    print(f"{args.file}: OK ({len(cfg.routes)} routes, upstream {cfg.upstream.url})")
    if not cfg.admin.listen.is_loopback and not os.environ.get(cfg.admin.token_env):
        print(f"warning: admin.listen {cfg.admin.listen} is beyond loopback and "
              f"${cfg.admin.token_env} is not set here: key operations will be refused",
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = _config(args)
    logs.configure(fmt=cfg.logging.format, level=cfg.logging.level)
    if os.environ.get("IDEMPROXY_WORKER"):  # started by the supervisor below
        from proxy.server import serve
        return _run(serve(cfg, worker=True))
    if cfg.workers > 1:
        prepare_multiprocess_metrics(cfg.data_dir)  # before prometheus_client is imported
        from proxy.supervisor import supervise
        return _run(supervise(cfg))
    from proxy.server import serve
    return _run(serve(cfg))


def prepare_multiprocess_metrics(data_dir: str) -> None:
    """Call before prometheus_client is imported: metrics then live in shared files."""
    root = Path(data_dir).expanduser().resolve() / "metrics"
    for old in root.glob("*"):  # left by supervisors that are gone (even by kill -9)
        if old.name.isdigit() and not _alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    path = root / str(os.getpid())  # one per supervisor: two may share a data_dir
    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cmd_migrate(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with open_store(_config(args)) as store:
            applied = await store.migrate()
        print("applied: " + ", ".join(applied) if applied else "schema is current")
        return 0
    return _run(go())


def cmd_purge(args: argparse.Namespace) -> int:
    from proxy.store.sweeper import sweep_once

    async def go() -> int:
        async with open_store(_config(args)) as store:
            await _require_schema(store)
            n = await sweep_once(store)
        print(f"deleted {n} expired records")
        return 0
    return _run(go())


def cmd_keys(args: argparse.Namespace) -> int:
    async def go() -> int:
        async with open_store(_config(args)) as store:
            await _require_schema(store)
            if args.verb == "list":
                print(json.dumps(await store.in_flight(limit=args.limit), indent=2))
                return 0
            if args.verb == "show":
                rec = await store.show(scope=args.scope, key=args.key)
                if rec is None:
                    print("no such key in that scope", file=sys.stderr)
                    return 1
                print(json.dumps(rec, indent=2))
                return 0
            if args.verb == "delete":
                done = await store.delete(scope=args.scope, key=args.key)
                miss = "no such key in that scope"
            else:
                done = await store.force_release(scope=args.scope, key=args.key)
                miss = "no in-flight claim for that key in that scope"
            print(f"{args.verb}d" if done else miss, file=sys.stdout if done else sys.stderr)
            return 0 if done else 1
    return _run(go())


class SchemaNotCurrent(Exception):
    """The database has not been migrated to the version this code needs."""


async def _require_schema(store: Any) -> None:
    """Operations never migrate as a side effect: a newer CLI must not change the schema
    under an older fleet. `idemproxy migrate` (or `serve`) does that on purpose."""
    if not await store.ready():
        raise SchemaNotCurrent("the database schema is missing or older than this "
                               "version; run `idemproxy migrate` first")


def _run(coro: Awaitable[int]) -> int:
    try:
        import uvloop
        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idemproxy", description=(
        "An idempotency reverse proxy: every retried request runs once."))
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help="YAML config (default: $IDEMPROXY_CONFIG, "
                        f"else {DEFAULT_CONFIG})")
        return sp

    with_config(sub.add_parser("serve", help="run the proxy")).set_defaults(fn=cmd_serve)
    cc = sub.add_parser("check-config", help="validate a config file and exit")
    cc.add_argument("file")
    cc.set_defaults(fn=cmd_check_config)
    with_config(sub.add_parser("migrate", help="apply database migrations")).set_defaults(
        fn=cmd_migrate)
    with_config(sub.add_parser("purge", help="delete expired records now")).set_defaults(
        fn=cmd_purge)
    keys = with_config(sub.add_parser("keys", help="inspect or fix one key"))
    keys.add_argument("verb", choices=["show", "delete", "release", "list"])
    keys.add_argument("scope", nargs="?", default="", help="ROUTE:TENANT, as `list` shows")
    keys.add_argument("key", nargs="?", default="")
    keys.add_argument("--limit", type=int, default=100, help="list: at most this many")
    keys.set_defaults(fn=cmd_keys)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verb", "list") != "list" and not (args.scope and args.key):
        print(f"idemproxy keys {args.verb}: needs SCOPE and KEY", file=sys.stderr)
        return 2
    try:
        code: int = args.fn(args)
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: database unreachable: {exc}", file=sys.stderr)
        return 1
    except SchemaNotCurrent as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line; the traceback only with IDEMPROXY_DEBUG
        if os.environ.get("IDEMPROXY_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
