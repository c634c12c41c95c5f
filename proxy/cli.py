"""The `idemproxy` command: serve, check-config, migrate, keys, purge, drain.

Exit codes: 0 success, 1 runtime failure (database unreachable, port in use, ...), 2 bad
usage or config. Errors are one clear line each, never a traceback or a bare exception
class name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from proxy import __version__, logs
from proxy.config import Config, load
from proxy.config.values import parse_duration
from proxy.errors import (
    ConfigError,
    RuntimeFailure,
    SchemaNotCurrent,
    StoreError,
    StoreUnavailable,
    UsageError,
    describe,
)
from proxy.store import State
from proxy.store.open import open_store

log = logging.getLogger("idemproxy")

CONFIG_ENV = "IDEMPROXY_CONFIG"
# The container image sets this to 0: without a database URL it then refuses to start
# rather than run a private, unshared database that goes with the container.
EMBEDDED_ENV = "IDEMPROXY_EMBEDDED_DATABASE"
LIST_LIMIT_MAX = 10_000


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get(CONFIG_ENV)
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


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load(args.file)
    n = len(cfg.routes)
    print(f"{args.file}: OK ({n} route{'' if n == 1 else 's'}, upstream {cfg.upstream.url})")
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
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
    require_database(cfg, create=True)
    for warning in cfg.warnings:
        log.warning("config: %s", warning)
    _ensure_ports_free(cfg)
    if cfg.workers > 1:
        prepare_multiprocess_metrics(cfg.data_dir)  # before prometheus_client is imported
        from proxy.supervisor import supervise
        return _run(supervise(cfg))
    from proxy.server import serve
    return _run(serve(cfg))


def _ensure_ports_free(cfg: Config) -> None:
    from proxy.ports import PortInUse, ensure_free
    try:
        ensure_free(cfg.listen, what="listen")
        ensure_free(cfg.admin.listen, what="admin.listen")
    except PortInUse as exc:
        raise RuntimeFailure(str(exc)) from None


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
    cfg = _config(args)
    require_database(cfg, create=True)

    async def go() -> int:
        async with open_store(cfg) as store:
            applied = await store.migrate()
        print("applied: " + ", ".join(applied) if applied else "schema is current")
        return 0
    return _run(go())


def cmd_purge(args: argparse.Namespace) -> int:
    from proxy.store.sweeper import sweep_once

    cfg = _config(args)
    require_database(cfg, create=False)

    async def go() -> int:
        async with open_store(cfg) as store:
            await _require_schema(store)
            n = await sweep_once(store)
        print(f"deleted {n} expired records")
        return 0
    return _run(go())


def cmd_keys(args: argparse.Namespace) -> int:
    from proxy import keyops

    if args.verb == "generate":
        return keyops.generate(args)
    if args.verb in keyops.VERBS:
        return _with_sealer(args, lambda cfg, store: keyops.run(args, cfg, store))
    if args.verb != "list" and not (args.scope and args.key):
        raise UsageError(f"idemproxy keys {args.verb}: needs SCOPE and KEY (`idemproxy "
                         "keys list` shows both)")
    cfg = _config(args)
    require_database(cfg, create=False)

    async def go() -> int:
        async with open_store(cfg) as store:
            await _require_schema(store)
            if args.verb == "list":
                rows = await store.list_keys(
                    limit=args.limit, route=args.route,
                    state=None if args.state is None else State[args.state.upper()],
                    newer_than=args.newer_than, older_than=args.older_than)
                print(json.dumps(rows, indent=2))
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


def cmd_tenant_hash(args: argparse.Namespace) -> int:
    from proxy import keyops

    async def show(cfg: Config, store: Any) -> int:
        print(keyops.tenant_hash_of(cfg, store.sealer, args.value, header=args.header))
        return 0
    return _with_sealer(args, show)


def _with_sealer(args: argparse.Namespace,
                 fn: Callable[[Config, Any], Awaitable[int]]) -> int:
    """Run `fn` on the migrated store with its sealer (keys and installation secret)."""
    from proxy.server import open_sealer

    cfg = _config(args)
    require_database(cfg, create=False)

    async def go() -> int:
        async with open_store(cfg) as store:
            await _require_schema(store)
            await open_sealer(cfg, store, quiet=True)
            code: int = await fn(cfg, store)
            return code
    return _run(go())


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


def _limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= LIST_LIMIT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to "
                                         f"{LIST_LIMIT_MAX}")
    return n


def _age(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idemproxy", description=(
        "An idempotency reverse proxy: every retried request runs once."))
    p.add_argument("--version", action="version", version=f"idemproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help=f"YAML config (default: ${CONFIG_ENV}; "
                        "one of the two is required)")
        return sp

    with_config(sub.add_parser("serve", help="run the proxy")).set_defaults(fn=cmd_serve)
    cc = sub.add_parser("check-config", help="validate a config file and exit")
    cc.add_argument("file")
    cc.set_defaults(fn=cmd_check_config)
    with_config(sub.add_parser("migrate", help="apply database migrations")).set_defaults(
        fn=cmd_migrate)
    with_config(sub.add_parser("purge", help="delete expired records now")).set_defaults(
        fn=cmd_purge)
    keys = with_config(sub.add_parser(
        "keys", help="list stored keys, or inspect or fix one",
        description="list: stored keys and in-flight claims, newest first, each with the "
        "scope (ROUTE:TENANT) that show, delete and release take."))
    keys.add_argument("verb", choices=["show", "delete", "release", "list", "generate",
                                       "usage", "reencrypt", "purge"])
    keys.add_argument("scope", nargs="?", default="", help="ROUTE:TENANT, as `list` shows")
    keys.add_argument("key", nargs="?", default="")
    keys.add_argument("--limit", type=_limit, default=100,
                      help=f"list: at most this many (1 to {LIST_LIMIT_MAX}, default 100)")
    keys.add_argument("--route", help="list: only this route's keys")
    keys.add_argument("--state", choices=["in_flight", "completed"],
                      help="list: only claims still running, or only stored answers")
    keys.add_argument("--newer-than", type=_age, metavar="AGE",
                      help="list: only keys created within AGE (e.g. 15m, 24h)")
    keys.add_argument("--older-than", type=_age, metavar="AGE",
                      help="list: only keys created more than AGE ago")
    keys.add_argument("--batch", type=_limit, default=100,
                      help="reencrypt: records per transaction (default 100)")
    keys.add_argument("--tenant-of", metavar="CREDENTIAL",
                      help="purge: every record of the tenant this credential maps to")
    keys.add_argument("--tenant", metavar="HASH", help="purge: every record of this tenant")
    keys.add_argument("--header", default="Authorization",
                      help="purge --tenant-of: the header the credential is sent in")
    keys.set_defaults(fn=cmd_keys)
    th = with_config(sub.add_parser(
        "tenant-hash", help="the tenant hash a credential or tenant header maps to"))
    th.add_argument("value", help="e.g. 'Bearer sk_live_...' (its header: --header)")
    th.add_argument("--header", default="Authorization")
    th.set_defaults(fn=cmd_tenant_hash)
    from proxy import drain
    drain.add_parser(sub, with_config=with_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.fn(args)
        return code
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StoreUnavailable as exc:
        print(f"error: database unreachable: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: the database refused: {exc}", file=sys.stderr)
        return 1
    except (SchemaNotCurrent, RuntimeFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line; the traceback only with IDEMPROXY_DEBUG
        if os.environ.get("IDEMPROXY_DEBUG"):
            raise
        print(f"error: unexpected failure ({describe(exc)}); IDEMPROXY_DEBUG=1 shows "
              "the traceback", file=sys.stderr)
        return 1
