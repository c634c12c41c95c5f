"""`idemproxy keys list|show|delete|release`: idempotency keys, straight in the database.

A key is named by its scope (`ROUTE:TENANT`, as `keys list` prints it) or by its route
alone: the route's scopes holding the key are looked up, and when more than one tenant
used the key they are listed for the operator to pick (exit 2), never guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from proxy.cliutil import emit, known_route, load_config, opened, run
from proxy.config import Config
from proxy.errors import UsageError
from proxy.store import State

LIST_COLUMNS = ("scope", "key", "state", "status", "created_at", "expires_at", "body_size")


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.route is not None:
        known_route(cfg, args.route)

    async def go() -> int:
        async with opened(cfg) as store:
            rows = await store.list_keys(
                limit=args.limit, route=args.route,
                state=None if args.state is None else State[args.state.upper()],
                newer_than=args.newer_than, older_than=args.older_than)
        emit(rows, output=args.output, columns=LIST_COLUMNS)
        return 0
    return run(go())


async def _scope(cfg: Config, store: Any, name: str, key: str) -> str | None:
    """The scope `name` stands for: itself when it is one (ROUTE:TENANT); for a route,
    the one scope holding `key` (None when none does)."""
    from proxy.store.inspect import scopes_holding

    if ":" in name:  # a scope names what is stored, even of a route no longer configured
        return name
    known_route(cfg, name)
    scopes = await scopes_holding(store, route=name, key=key)
    if len(scopes) > 1:
        raise UsageError(f"key {key!r} is held by {len(scopes)} tenants of route {name!r}; "
                         f"name one scope: {', '.join(scopes)}")
    return scopes[0] if scopes else None


def _missing(name: str, what: str = "no such key") -> int:
    hint = "" if ":" in name else \
        " (a key is looked up in the route's scopes, ROUTE:TENANT; `idemproxy keys list " \
        f"--route {name}` lists them)"
    print(f"{what} in {name}{hint}", file=sys.stderr)
    return 1


def cmd_show(args: argparse.Namespace) -> int:
    from proxy.store.inspect import stored_answer

    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            scope = await _scope(cfg, store, args.scope, args.key)
            rec = None if scope is None else await store.show(scope=scope, key=args.key)
            if scope is None or rec is None:
                return _missing(args.scope)
            answer = await stored_answer(store, scope=scope, key=args.key,
                                         with_body=args.body)
        if answer is not None:
            rec["headers"] = [list(h) for h in answer[0]]
        if args.body:
            sys.stdout.buffer.write(answer[1] if answer and answer[1] is not None else b"")
            return 0
        print(json.dumps(rec, indent=2))
        return 0
    return run(go())


def cmd_change(args: argparse.Namespace) -> int:
    """delete or release."""
    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg) as store:
            scope = await _scope(cfg, store, args.scope, args.key)
            if args.verb == "delete":
                done = scope is not None and await store.delete(scope=scope, key=args.key)
                miss = "no such key"
            else:
                done = scope is not None and await store.force_release(scope=scope,
                                                                       key=args.key)
                miss = "no in-flight claim for that key"
        if not done:
            return _missing(args.scope, miss)
        print(f"{args.verb}d")
        return 0
    return run(go())
