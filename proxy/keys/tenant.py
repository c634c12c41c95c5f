"""Whose key it is: the tenant a request's credential names, as a keyed hash, and the
scope (route name + tenant) keys match inside."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from proxy.config import JwtTenant, MissingCredential, Route, TenantMode
from proxy.errors import CredentialMissing, TokenInvalid
from proxy.keys.sources import header_values

ANONYMOUS = "anonymous"  # the shared tenant of `missing: share` requests (never a hash)


Verify = Callable[[JwtTenant, str], str]  # (route's jwt, token) -> principal (identity.py)


def tenant_of(route: Route, headers: Mapping[str, str], *,
              keyed: Callable[[bytes], str], verify: Verify | None = None) -> str:
    """A hash naming the tenant; raw credentials are never stored or logged. `keyed` is
    the installation's keyed hash (Sealer.tenant_hash, proxy/sealing.py).

    No credential (no header, or only whitespace) is no tenant: refused with a 400 that
    names the header, unless the route lets anonymous requests share one scope
    (`tenant: {missing: share}`). Design §4: client A never receives B's answer.

    A principal (`tenant: {jwt: ...}`, verified by `verify`, or a gateway's
    `{header: ..., trusted: true}`) is hashed apart from credentials (principal_hash), so
    a refreshed token keeps its scope, and moving a route between the two keeps it too.
    """
    tenant = route.tenant
    if tenant.mode is TenantMode.NONE:
        return "-"
    scheme = tenant.mode is TenantMode.AUTHORIZATION
    values = [normalize_credential(v, scheme=scheme or tenant.mode is TenantMode.JWT)
              for v in header_values(headers, tenant.header)]
    values = [v for v in values if v]
    if not values:
        if tenant.missing is MissingCredential.SHARE:
            return ANONYMOUS
        raise CredentialMissing(
            f"Route {route.name!r} scopes idempotency keys by the {tenant.header} header, "
            f"and this request has none; send {tenant.header}.")
    if tenant.mode is TenantMode.JWT:
        assert verify is not None, "a jwt route needs the process's Identities"
        return principal_hash(verify(tenant.jwt, bearer_token(values)), keyed=keyed)
    if tenant.trusted:
        if len(values) > 1:
            raise CredentialMissing(f"The request carries {len(values)} {tenant.header} "
                                    "headers; the gateway sets one.")
        return principal_hash(values[0], keyed=keyed)
    return tenant_hash("\n".join(values), keyed=keyed)


def bearer_token(values: list[str]) -> str:
    """The token of the one `Authorization: Bearer ...` line (RFC 6750 §2.1)."""
    words = values[0].split(" ") if len(values) == 1 else []
    if len(words) != 2 or words[0] != "Bearer":
        raise TokenInvalid("The route takes its tenant from a bearer token: send one "
                           "Authorization: Bearer <JWT> header.")
    return words[1]


def principal_hash(principal: str, *, keyed: Callable[[bytes], str]) -> str:
    """The tenant of a principal (a verified claim, a gateway's header): keyed like a
    credential, in a domain of its own, so no credential hashes to a principal's tenant."""
    return keyed(b"principal\x00" + principal.encode("utf-8", "surrogateescape"))


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
