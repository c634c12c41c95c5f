"""`idemproxy keys generate|usage|reencrypt|purge` and `idemproxy tenant-hash`: the
operator's side of data at rest (issue #15; docs/security.md "Data at rest").

    keys generate [ID]              a new key as ID:BASE64, for $IDEMPROXY_ENCRYPTION_KEYS
    keys usage                      records sealed and fingerprinted by each key
    keys reencrypt [--batch N]      re-seal every completed record under the primary key
    keys purge --tenant-of CRED     delete every record of the tenant CRED maps to
    keys purge --tenant HASH        ... of the tenant with this hash (claims still in
                                    flight are left alone: exit 1, run it again)
    tenant-hash CRED [--header H]   the tenant hash a credential or header value maps to
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from proxy import keys
from proxy.config import Config, Route, Tenant, TenantMode
from proxy.routing import PathPattern
from proxy.sealing import Sealer, generate_key
from proxy.store.atrest import erase_tenant, key_usage, reencrypt_batch

VERBS = ("generate", "usage", "reencrypt", "purge")
TENANT_HASH = re.compile(r"^[0-9a-f]{32}$")


def tenant_hash_of(cfg: Config, sealer: Sealer, value: str, *, header: str) -> str:
    """The hash `value` of `header` maps to, by the same function the proxy uses (the
    first route scoping by that header decides the normalisation)."""
    route = next((r for r in cfg.routes if r.tenant.mode is not TenantMode.NONE
                  and r.tenant.header.lower() == header.lower()), None)
    if route is None:
        mode = TenantMode.AUTHORIZATION if header.lower() == "authorization" \
            else TenantMode.HEADER
        route = Route(name="-", methods=frozenset({"POST"}), path=PathPattern.compile("/"),
                      tenant=Tenant(mode=mode, header=header))
    return keys.tenant_of(route, {header: value}, keyed=sealer.tenant_hash)


async def run(args: argparse.Namespace, cfg: Config, store: Any) -> int:
    """One of VERBS against an open, migrated store with its sealer loaded."""
    sealer: Sealer = store.sealer
    if args.verb == "usage":
        configured = [k.id for k in sealer.keys]
        rows = [{"key_id": u.key_id, "sealed": u.sealed, "fingerprints": u.fingerprints,
                 "configured": u.key_id in configured if u.key_id else None}
                for u in await key_usage(store)]
        print(json.dumps({"primary": sealer.primary.id if sealer.primary else None,
                          "configured": configured, "in_use": rows}, indent=2))
        return 0
    if args.verb == "reencrypt":
        if sealer.primary is None:
            print(f"error: no encryption keys in ${cfg.encryption.keys_env}", file=sys.stderr)
            return 2
        total, after = 0, ("", "")
        while True:
            n, nxt = await reencrypt_batch(store, after=after, batch=args.batch)
            total += n
            if nxt is None:
                break
            after = nxt
        print(f"re-sealed {total} records with key {sealer.primary.id}")
        return 0
    tenant = args.tenant
    if args.tenant_of is not None:
        tenant = tenant_hash_of(cfg, sealer, args.tenant_of, header=args.header)
    if not tenant or not TENANT_HASH.match(tenant):
        print("error: keys purge needs --tenant-of CREDENTIAL or --tenant HASH (32 hex "
              "digits, as `idemproxy tenant-hash` prints)", file=sys.stderr)
        return 2
    done = await erase_tenant(store, tenant)
    print(f"deleted {done.deleted} records of tenant {tenant}")
    if done.in_flight:  # never deleted: that would run the tenant's retry a second time
        # Not finished: exit 1, so a script erasing on request runs it again later.
        print(f"error: left {done.in_flight} in-flight claims of tenant {tenant} alone; "
              "run this again once they complete", file=sys.stderr)
        return 1
    return 0


def generate(args: argparse.Namespace) -> int:
    print(f"{args.scope or 'k1'}:{generate_key()}")
    return 0
