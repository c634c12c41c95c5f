"""`idemproxy encryption-keys ...` and `idemproxy tenant ...`: the operator's side of data
at rest (issue #15; docs/security.md "Data at rest").

    encryption-keys generate [ID]         a new key as ID:BASE64, for $IDEMPROXY_ENCRYPTION_KEYS
    encryption-keys usage                 records sealed and fingerprinted by each key
    encryption-keys reencrypt [--batch N] re-seal every completed record under the primary key
    encryption-keys purge KEY_ID          delete the completed records a retired key sealed
    tenant hash CRED [--header H]         the tenant hash a credential or header value maps to
    tenant erase --tenant-of CRED         delete every completed record of that tenant
    tenant erase --tenant HASH            ... of the tenant with this hash (claims still in
                                          flight are left alone: exit 1, run it again)
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from proxy import keys
from proxy.cliutil import emit, load_config, opened, run
from proxy.config import Config, Route, Tenant, TenantMode
from proxy.errors import UsageError
from proxy.http.routing import PathPattern
from proxy.sealing import Sealer, generate_key
from proxy.store.atrest import erase_tenant, key_usage, reencrypt_batch

TENANT_HASH = re.compile(r"^[0-9a-f]{32}$")
USAGE_COLUMNS = ("key_id", "sealed", "fingerprints", "configured", "primary")


def tenant_hash_of(cfg: Config, sealer: Sealer, value: str, *, header: str) -> str:
    """The hash `value` of `header` maps to, by the same function the proxy uses (the
    first route scoping by that header decides the normalisation). On a route scoped by
    a principal (a JWT claim, a trusted gateway header), `value` is the principal."""
    route = next((r for r in cfg.routes if r.tenant.mode is not TenantMode.NONE
                  and r.tenant.header.lower() == header.lower()), None)
    if route is None:
        mode = TenantMode.AUTHORIZATION if header.lower() == "authorization" \
            else TenantMode.HEADER
        route = Route(name="-", methods=frozenset({"POST"}), path=PathPattern.compile("/"),
                      tenant=Tenant(mode=mode, header=header))
    if route.tenant.mode is TenantMode.JWT or route.tenant.trusted:  # value: the principal
        return keys.principal_hash(value.strip(), keyed=sealer.tenant_hash)
    return keys.tenant_of(route, {header: value}, keyed=sealer.tenant_hash)


def generate(args: argparse.Namespace) -> int:
    print(f"{args.key_id or 'k1'}:{generate_key()}")
    return 0


def usage(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            sealer: Sealer = store.sealer
            configured = [k.id for k in sealer.keys]
            primary = sealer.primary.id if sealer.primary else None
            rows = [{"key_id": u.key_id or "(none: plaintext)", "sealed": u.sealed,
                     "fingerprints": u.fingerprints, "configured": u.key_id in configured,
                     "primary": u.key_id is not None and u.key_id == primary}
                    for u in await key_usage(store)]
        if sealer.primary is None:  # said once, on stderr, so the listing stays parseable
            print(f"encryption at rest is off: ${cfg.encryption.keys_env} is not set, so "
                  "stored answers are plaintext (see docs/security.md)", file=sys.stderr)
        emit(rows, output=args.output, columns=USAGE_COLUMNS)
        return 0
    return run(go())


def reencrypt(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            primary = store.sealer.primary
            if primary is None:
                raise UsageError(f"no encryption keys in ${cfg.encryption.keys_env}: "
                                 "nothing to re-seal under")
            total, after = 0, ("", "")
            while True:
                n, nxt = await reencrypt_batch(store, after=after, batch=args.batch)
                total += n
                if nxt is None:
                    break
                after = nxt
        print(f"re-sealed {total} records with key {primary.id}")
        return 0
    return run(go())


def purge(args: argparse.Namespace) -> int:
    from proxy.store.inspect import purge_key_id

    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            if args.key_id in [k.id for k in store.sealer.keys]:
                raise UsageError(f"key {args.key_id!r} is still in "
                                 f"${cfg.encryption.keys_env}: remove it there first "
                                 "(`encryption-keys reencrypt` moves its records off it)")
            n = await purge_key_id(store, args.key_id)
        print(f"deleted {n} records of key {args.key_id}")
        return 0
    return run(go())


def tenant_hash(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            print(tenant_hash_of(cfg, store.sealer, args.value, header=args.header))
        return 0
    return run(go())


def erase(args: argparse.Namespace) -> int:
    cfg = load_config(args)

    async def go() -> int:
        async with opened(cfg, sealer=True) as store:
            return await _erase(args, cfg, store)
    return run(go())


async def _erase(args: argparse.Namespace, cfg: Config, store: Any) -> int:
    tenant = args.tenant
    if args.tenant_of is not None:
        tenant = tenant_hash_of(cfg, store.sealer, args.tenant_of, header=args.header)
    if not tenant or not TENANT_HASH.match(tenant):
        raise UsageError("tenant erase needs --tenant-of CREDENTIAL or --tenant HASH (32 "
                         "hex digits, as `idemproxy tenant hash` prints)")
    done = await erase_tenant(store, tenant)
    print(f"deleted {done.deleted} records of tenant {tenant}")
    if done.in_flight:  # never deleted: that would run the tenant's retry a second time
        # Not finished: exit 1, so a script erasing on request runs it again later.
        print(f"error: left {done.in_flight} in-flight claims of tenant {tenant} alone; "
              "run this again once they complete", file=sys.stderr)
        return 1
    return 0
