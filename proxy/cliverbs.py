"""The parsers of the nouns with verbs: `keys`, `encryption-keys`, `tenant`, and the old
spellings kept for one release (each prints a deprecation line, docs/upgrading.md).

Every verb takes --config and shows an example in its --help (tests/test_cli_grammar.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from proxy import keycmds, keyops
from proxy.cliutil import CONFIG_ENV, OUTPUTS, deprecated
from proxy.config.values import parse_duration

LIST_LIMIT_MAX = 10_000


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


def verb(sub: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str,
          example: str, *, hidden: bool = False) -> argparse.ArgumentParser:
    """A command or verb with --config and its example in `--help`."""
    # A hidden one (an old spelling) gets no help line: argparse then leaves it out.
    shown = {} if hidden else {"help": help}
    sp: argparse.ArgumentParser = sub.add_parser(
        name, description=help, epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter, **shown)
    sp.add_argument("--config", "-c", help=f"YAML config (default: ${CONFIG_ENV}; "
                    "one of the two is required)")
    sp.set_defaults(fn=fn)
    return sp


def alias(old: str, new: str, fn: Callable[[argparse.Namespace], int]
           ) -> Callable[[argparse.Namespace], int]:
    def run_old(args: argparse.Namespace) -> int:
        deprecated(old, new)
        return fn(args)
    return run_old


def _output(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--output", "-o", choices=OUTPUTS, default="json",
                    help="json (default) or an aligned table")


def _tenant_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--tenant-of", metavar="CREDENTIAL",
                    help="every record of the tenant this credential maps to")
    sp.add_argument("--tenant", metavar="HASH", help="every record of this tenant")
    sp.add_argument("--header", default="Authorization",
                    help="--tenant-of: the header the credential is sent in")


def keys_noun(sub: Any) -> None:
    keys = sub.add_parser("keys", help="idempotency keys: list, show, delete, release",
                          description="Idempotency keys, straight in the database. A key "
                          "is named by ROUTE (when one tenant holds it) or SCOPE "
                          "(ROUTE:TENANT, as `keys list` prints it) and KEY.")
    verbs = keys.add_subparsers(dest="verb", required=True,
                                metavar="{list,show,delete,release}")
    ls = verb(verbs, "list", keycmds.cmd_list, "stored keys and in-flight claims, newest "
               "first", "idemproxy keys list --route charges --state in_flight -o table")
    ls.add_argument("--limit", type=_limit, default=100,
                    help=f"at most this many (1 to {LIST_LIMIT_MAX}, default 100)")
    ls.add_argument("--route", help="only this route's keys (a route of the config)")
    ls.add_argument("--state", choices=["in_flight", "completed"],
                    help="only claims still running, or only stored answers")
    ls.add_argument("--newer-than", type=_age, metavar="AGE",
                    help="only keys created within AGE (e.g. 15m, 24h)")
    ls.add_argument("--older-than", type=_age, metavar="AGE",
                    help="only keys created more than AGE ago")
    _output(ls)
    for name, fn, text, example in (
            ("show", keycmds.cmd_show, "one key's record and its stored answer's status, "
             "headers and body size", "idemproxy keys show charges order-1834 --body"),
            ("delete", keycmds.cmd_change, "forget a key: its next request executes again",
             "idemproxy keys delete charges order-1834"),
            ("release", keycmds.cmd_change, "end a stuck in-flight claim now",
             "idemproxy keys release charges:3f9c0a... order-1834")):
        sp = verb(verbs, name, fn, text, example)
        sp.add_argument("scope", metavar="ROUTE|SCOPE",
                        help="a route of the config, or ROUTE:TENANT as `keys list` prints")
        sp.add_argument("key", metavar="KEY")
        if name == "show":
            sp.add_argument("--body", action="store_true",
                            help="print the stored body itself (raw bytes) instead")
    # The spellings of the last release, for one more (docs/upgrading.md).
    for name, new in (("generate", "encryption-keys generate"),
                      ("usage", "encryption-keys usage"),
                      ("reencrypt", "encryption-keys reencrypt"),
                      ("purge", "tenant erase")):
        sp = verb(verbs, name, alias(f"keys {name}", new, _ENCRYPTION[name]), "", "",
                   hidden=True)
        _ENCRYPTION_ARGS[name](sp)


_ENCRYPTION: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": keyops.generate, "usage": keyops.usage, "reencrypt": keyops.reencrypt,
    "purge": keyops.erase}
_ENCRYPTION_ARGS: dict[str, Callable[[argparse.ArgumentParser], object]] = {
    "generate": lambda sp: sp.add_argument("key_id", nargs="?", metavar="ID"),
    "usage": _output,
    "reencrypt": lambda sp: sp.add_argument("--batch", type=_limit, default=100,
                                            help="records per transaction (default 100)"),
    "purge": _tenant_args}


def encryption_keys_noun(sub: Any) -> None:
    ek = sub.add_parser("encryption-keys", help="keys that seal stored answers at rest: "
                        "generate, usage, reencrypt, purge")
    verbs = ek.add_subparsers(dest="verb", required=True)
    _ENCRYPTION_ARGS["generate"](verb(
        verbs, "generate", keyops.generate, "a new key as ID:BASE64, for "
        "IDEMPROXY_ENCRYPTION_KEYS (no config or database needed)",
        "idemproxy encryption-keys generate k2"))
    _ENCRYPTION_ARGS["usage"](verb(
        verbs, "usage", keyops.usage, "per key id, the records it sealed and fingerprinted",
        "idemproxy encryption-keys usage --output table"))
    _ENCRYPTION_ARGS["reencrypt"](verb(
        verbs, "reencrypt", keyops.reencrypt, "re-seal completed records under the "
        "primary key, in small transactions", "idemproxy encryption-keys reencrypt"))
    pg = verb(verbs, "purge", keyops.purge, "delete the completed records a retired "
               "(no longer configured) key sealed or fingerprinted",
               "idemproxy encryption-keys purge k1")
    pg.add_argument("key_id", metavar="KEY_ID")


def tenant_noun(sub: Any) -> None:
    tn = sub.add_parser("tenant", help="one tenant: its hash, or erase its records")
    verbs = tn.add_subparsers(dest="verb", required=True)
    th = verb(verbs, "hash", keyops.tenant_hash, "the tenant hash a credential or "
               "tenant header maps to", "idemproxy tenant hash 'Bearer sk_live_...'")
    th.add_argument("value", help="e.g. 'Bearer sk_live_...' (its header: --header)")
    th.add_argument("--header", default="Authorization")
    _tenant_args(verb(verbs, "erase", keyops.erase, "delete every completed record of "
                       "one tenant (claims in flight are left: exit 1, run it again)",
                       "idemproxy tenant erase --tenant-of 'Bearer sk_live_...'"))
