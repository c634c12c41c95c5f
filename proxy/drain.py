"""`idemproxy drain [--wait]`: ask a running proxy to drain, for a Kubernetes `preStop`
hook (the order is in proxy/lifecycle.py and deploy/kubernetes/README.md).

It calls `POST /admin/drain` on the proxy's admin listener: the address from `--admin`,
else from the config's `admin.listen` (a wildcard address means this host's loopback),
with the bearer token from `admin.token_env` when that is set. Exit codes: 0 drained (or,
without --wait, the drain started), 1 still draining when --timeout ran out or the proxy
could not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any

from proxy.config.values import parse_duration
from proxy.errors import RuntimeFailure, UsageError

WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
DEFAULT_TOKEN_ENV = "IDEMPROXY_ADMIN_TOKEN"


def add_parser(sub: Any, *, with_config: Any) -> None:
    """Register `idemproxy drain` on the CLI's subparsers."""
    p = with_config(sub.add_parser(
        "drain", help="drain a running proxy (no new claims; in-flight work finishes)",
        description="For a preStop hook: POST /admin/drain on the proxy's admin listener."))
    p.add_argument("--wait", action="store_true",
                   help="return only once the drain is done (exit 1 if --timeout passes)")
    p.add_argument("--timeout", type=_duration, default=30.0, metavar="DURATION",
                   help="with --wait: how long at most (default 30s)")
    p.add_argument("--admin", metavar="URL",
                   help="the admin listener, e.g. http://127.0.0.1:9090 (default: from "
                   "the config's admin.listen)")
    p.set_defaults(fn=cmd_drain)


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_drain(args: argparse.Namespace) -> int:
    base, token_env = _admin_of(args)
    url = base.rstrip("/") + "/admin/drain" + (f"?wait={args.timeout:g}s" if args.wait else "")
    req = urllib.request.Request(url, method="POST", data=b"")
    token = os.environ.get(token_env, "")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    status, doc = _call(req, timeout=(args.timeout if args.wait else 0) + 10)
    print(json.dumps(doc))
    if status == 200 or (status == 202 and not args.wait):
        return 0
    if status == 202:
        print(f"error: still draining after {args.timeout:g}s", file=sys.stderr)
        return 1
    raise RuntimeFailure(f"the admin listener answered {status}: {doc.get('detail', doc)}")


def _admin_of(args: argparse.Namespace) -> tuple[str, str]:
    """The admin base URL and the token's environment variable."""
    if args.admin:
        return args.admin, DEFAULT_TOKEN_ENV
    path = args.config or os.environ.get("IDEMPROXY_CONFIG")
    if not path:
        raise UsageError("pass --admin URL, or --config FILE (or IDEMPROXY_CONFIG) to read "
                         "admin.listen from")
    from proxy.config import load

    cfg = load(path)
    host = WILDCARDS.get(cfg.admin.listen.host, cfg.admin.listen.host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{cfg.admin.listen.port}", cfg.admin.token_env


def _call(req: urllib.request.Request, *, timeout: float) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (our URL)
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read() or b"{}")
        except ValueError:
            doc = {}
        return exc.code, doc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RuntimeFailure(f"could not reach the admin listener at {req.full_url}: "
                             f"{getattr(exc, 'reason', exc)}") from None
