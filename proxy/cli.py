"""The `idemproxy` command: one grammar, `idemproxy NOUN [VERB] [ARGS] [--config FILE]`.

    serve | check-config [FILE] | migrate | purge | drain (proxy/drain.py)
    keys list | show | delete | release          idempotency keys (proxy/keycmds.py)
    encryption-keys generate | usage | reencrypt | purge   (proxy/keyops.py)
    tenant hash | erase                          one tenant's hash, and its erasure

Every command reads --config FILE (or -c), else $IDEMPROXY_CONFIG. The spellings of the
last release (`keys generate|usage|reencrypt`, `keys purge --tenant...`, `tenant-hash`)
still work, with a deprecation line on stderr (docs/upgrading.md).

Exit codes: 0 success, 1 runtime failure (database unreachable, port in use, ...), 2 bad
usage or config. Errors are one clear line each, never a traceback or a bare exception
class name.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from proxy import __version__, keyops, logs
from proxy.cliutil import (
    CONFIG_ENV,
    EMBEDDED_ENV,
    load_config,
    require_database,
    require_schema,
    run,
)
from proxy.cliverbs import (
    LIST_LIMIT_MAX,
    alias,
    encryption_keys_noun,
    keys_noun,
    tenant_noun,
    verb,
)
from proxy.config import Config
from proxy.errors import (
    ConfigError,
    RuntimeFailure,
    SchemaNotCurrent,
    StoreError,
    StoreUnavailable,
    UsageError,
    describe,
)
from proxy.store.open import open_store

log = logging.getLogger("idemproxy")

__all__ = ["CONFIG_ENV", "EMBEDDED_ENV", "LIST_LIMIT_MAX", "build_parser", "main",
           "require_database"]
_config, _run, _require_schema = load_config, run, require_schema  # the names commands use


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    n = len(cfg.routes)
    print(f"{cfg.source}: OK ({n} route{'' if n == 1 else 's'}, upstream {cfg.upstream.url})")
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
    cfg = _config(args)
    require_database(cfg, create=False)

    async def go() -> int:
        async with open_store(cfg) as store:
            await _require_schema(store)
            n = await store.sweep()
        print(f"deleted {n} expired records")
        return 0
    return _run(go())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="idemproxy", description=(
        "An idempotency reverse proxy: every retried request runs once. "
        "`idemproxy COMMAND --help` shows each command with an example."))
    p.add_argument("--version", action="version", version=f"idemproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verb(sub, "serve", cmd_serve, "run the proxy",
          "idemproxy serve --config /etc/idemproxy/config.yaml")
    cc = verb(sub, "check-config", cmd_check_config, "validate a config file and exit "
              "(errors exit 2; warnings are printed)", "idemproxy check-config config.yaml")
    cc.add_argument("file", nargs="?", help="the config (or --config, $IDEMPROXY_CONFIG)")
    verb(sub, "migrate", cmd_migrate, "apply database migrations",
          "idemproxy migrate --config /etc/idemproxy/config.yaml")
    verb(sub, "purge", cmd_purge, "delete expired records now", "idemproxy purge")
    keys_noun(sub)
    encryption_keys_noun(sub)
    tenant_noun(sub)
    old = verb(sub, "tenant-hash", alias("tenant-hash", "tenant hash", keyops.tenant_hash),
               "", "", hidden=True)
    old.add_argument("value")
    old.add_argument("--header", default="Authorization")
    from proxy import drain

    drain.add_parser(sub, with_config=_with_config)
    return p


# The help examples of commands that register their own parser (drain.add_parser).
_EXAMPLES = {"drain": "idemproxy drain --wait --timeout 25s --config /etc/idemproxy/config.yaml"}


def _with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config and the help's example, for a command registered by its own module."""
    sp.add_argument("--config", "-c", help=f"YAML config (default: ${CONFIG_ENV}; "
                    "one of the two is required)")
    sp.formatter_class = argparse.RawDescriptionHelpFormatter
    sp.epilog = f"example:\n  {_EXAMPLES[sp.prog.split()[-1]]}"
    return sp


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
