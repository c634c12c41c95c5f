"""Whose key it is: the tenant a request's credential names, as a keyed hash, and the
scope (route name + tenant) keys match inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from proxy.config import MissingCredential, Route, TenantMode
from proxy.errors import CredentialMissing
from proxy.keys.sources import header_values

ANONYMOUS = "anonymous"  # the shared tenant of `missing: share` requests (never a hash)


def tenant_of(route: Route, headers: Mapping[str, str], *,
              keyed: Callable[[bytes], str]) -> str:
    """A hash naming the tenant; raw credentials are never stored or logged. `keyed` is
    the installation's keyed hash (Sealer.tenant_hash, proxy/sealing.py).

    No credential (no header, or only whitespace) is no tenant: refused with a 400 that
    names the header, unless the route lets anonymous requests share one scope
    (`tenant: {missing: share}`). Design §4: client A never receives B's answer.
    """
    tenant = route.tenant
    if tenant.mode is TenantMode.NONE:
        return "-"
    scheme = tenant.mode is TenantMode.AUTHORIZATION
    values = [normalize_credential(v, scheme=scheme)
              for v in header_values(headers, tenant.header)]
    values = [v for v in values if v]
    if not values:
        if tenant.missing is MissingCredential.SHARE:
            return ANONYMOUS
        raise CredentialMissing(
            f"Route {route.name!r} scopes idempotency keys by the {tenant.header} header, "
            f"and this request has none; send {tenant.header}.")
    return tenant_hash("\n".join(values), keyed=keyed)


def normalize_credential(value: str, *, scheme: bool) -> str:
    """One spelling per credential: surrounding whitespace gone, inner runs of spaces and
    tabs one space, and (`scheme`, for Authorization) the auth scheme in one case, since
    RFC 9110 §11.1 makes it case-insensitive: `bearer  x` and `Bearer x` are one tenant.
    The scheme is capitalised (`Bearer`, `Basic`), the spelling nearly every client
    sends, so their tenants hash as before. The credential itself keeps its case."""
    words = value.split()
    if scheme and words:
        words[0] = words[0].capitalize()
    return " ".join(words)


def tenant_hash(credential: str, *, keyed: Callable[[bytes], str]) -> str:
    """The tenant half of a scope: the one place a (normalised) credential is hashed,
    with an HMAC under the installation's secret: a plain SHA-256 would let anyone who
    reads a log line test guessed credentials offline (`printf 'Bearer x' | sha256sum`)."""
    return keyed(credential.encode("utf-8", "surrogateescape"))


def scope_of(route: Route, tenant: str) -> str:
    """Keys only ever match inside route name + tenant."""
    return f"{route.name}:{tenant}"
