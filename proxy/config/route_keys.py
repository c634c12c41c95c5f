"""A route's `key` (header, path parameter or body pointers) and `tenant`, parsed."""

from __future__ import annotations

from typing import Any

from proxy.config.route_values import parse_pointers, positive
from proxy.config.schema import (
    JWT_ALGORITHMS,
    JwtTenant,
    KeySource,
    MissingCredential,
    Tenant,
    TenantMode,
)
from proxy.config.values import (
    Reader,
    bool_,
    enum_,
    format_duration,
    parse_duration,
    parse_header_name,
    str_,
)
from proxy.paths import PathPattern

KEY_FIELDS = {"header", "path", "body", "bucket", "raw", "headers"}
MAX_KEY_HEADERS = 8


def parse_key(r: Reader, raw: object, path: str, pattern: PathPattern | None) -> KeySource:
    if raw is None:
        return KeySource()
    d = r.section(raw, path, KEY_FIELDS)
    given = [k for k in ("header", "path", "body", "headers") if k in d]
    if given == ["body", "headers"]:
        return _parse_headers_key(r, d, path)
    if len(given) != 1:
        r.report(f"{path}: set exactly one of header, path, body (got "
                 f"{', '.join(given) or 'none'}); or headers, alone or with body")
        return KeySource()
    for extra in ("bucket", "raw"):
        if extra in d and "body" not in d:
            r.report(f"{path}.{extra}: only applies to key.body")
    if "header" in d:
        return KeySource(header=r.get(d, "header", f"{path}.header", parse_header_name,
                                      KeySource().header))
    if "headers" in d:
        return _parse_headers_key(r, d, path)
    if "path" in d:
        param = r.get(d, "path", f"{path}.path", str_, "")
        if pattern is not None and param not in pattern.params:
            r.report(f"{path}.path: {param!r} is not a parameter of {pattern.text!r} "
                     f"(has: {', '.join(pattern.params) or 'none'})")
        return KeySource(header=None, path=param)
    return _parse_body_key(r, d, path)


def parse_key_headers(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_KEY_HEADERS:
        raise ValueError(f"{value!r} is not a list of 1-{MAX_KEY_HEADERS} header names like "
                         "[ce-source, ce-id]")
    names = tuple(parse_header_name(h) for h in value)
    if len({n.lower() for n in names}) != len(names):
        raise ValueError(f"{value!r} names a header twice")
    return names


def _parse_headers_key(r: Reader, d: dict[str, Any], path: str) -> KeySource:
    """`headers`, and `body` beside it: the same values, in order, from the body (one
    pointer per header) when none of the headers is sent."""
    fallback: tuple[str, ...] = ("Idempotency-Key",)
    names = r.get(d, "headers", f"{path}.headers", parse_key_headers, fallback)
    body: tuple[str, ...] = ()
    if "body" in d:
        body = r.get(d, "body", f"{path}.body", parse_pointers, ())
        if body and len(body) != len(names):
            r.report(f"{path}.body: with key.headers, one pointer per header, in the same "
                     f"order (got {len(body)} for {len(names)} headers)")
    for extra in ("bucket", "raw"):
        if extra in d:
            r.report(f"{path}.{extra}: does not apply with key.headers")
    return KeySource(header=None, headers=names, body=body)


def _parse_body_key(r: Reader, d: dict[str, Any], path: str) -> KeySource:
    whole: tuple[str, ...] = ("",)
    pointers = r.get(d, "body", f"{path}.body", parse_pointers, whole)
    dflt = KeySource()
    src = KeySource(header=None, body=pointers,
                    bucket=r.get(d, "bucket", f"{path}.bucket", positive(parse_duration),
                                 dflt.bucket),
                    raw=r.get(d, "raw", f"{path}.raw", bool_, dflt.raw))
    if src.raw and (len(src.body) != 1 or src.body[0] == "" or src.bucket is not None):
        r.report(f"{path}.raw: true needs exactly one pointer to a value and no bucket "
                 f"(got body: {list(src.body)}"
                 f"{', bucket' if src.bucket is not None else ''})")
    return src


def parse_tenant(r: Reader, raw: object, path: str) -> Tenant:
    if raw is None or raw == "authorization":
        return Tenant()
    if raw == "none":
        return Tenant(mode=TenantMode.NONE, header="")
    if isinstance(raw, dict):
        d = r.section(raw, path, {"header", "missing", "trusted", "jwt"})
        missing = r.get(d, "missing", f"{path}.missing", enum_(MissingCredential),
                        Tenant().missing)
        if "jwt" in d:
            return _parse_jwt_tenant(r, d, path, missing)
        trusted = r.get(d, "trusted", f"{path}.trusted", bool_, False)
        if "header" not in d:  # {missing: share}: the Authorization header still
            if trusted:
                r.report(f"{path}.trusted: needs the header your auth gateway sets "
                         "({header: X-User-Id, trusted: true})")
            return Tenant(missing=missing)
        header = r.get(d, "header", f"{path}.header", parse_header_name, "")
        if not header:
            return Tenant()
        mode = TenantMode.AUTHORIZATION if header.lower() == "authorization" else \
            TenantMode.HEADER
        if trusted and mode is TenantMode.AUTHORIZATION:
            r.report(f"{path}.trusted: Authorization is the client's credential, not a "
                     "principal a gateway set; use tenant: {jwt: ...} to verify it")
        return Tenant(mode=mode, header=header if mode is TenantMode.HEADER else
                      "Authorization", missing=missing, trusted=trusted)
    r.report(f"{path}: {raw!r} is not one of: authorization, none, "
             "{header: NAME, missing: reject | share}, {header: NAME, trusted: true}, "
             "{jwt: {...}}")
    return Tenant()


JWT_FIELDS = {"claim", "jwks_file", "jwks_url", "issuer", "audience", "algorithms",
              "leeway", "refresh"}


def _parse_jwt_tenant(r: Reader, d: dict[str, Any], path: str,
                      missing: MissingCredential) -> Tenant:
    for extra in ("header", "trusted"):
        if extra in d:
            r.report(f"{path}.{extra}: does not apply with jwt (the token is the "
                     "Authorization header's)")
    at = f"{path}.jwt"
    j = r.section(d["jwt"], at, JWT_FIELDS)
    dflt = JwtTenant()
    cfg = JwtTenant(
        claim=r.get(j, "claim", f"{at}.claim", _nonempty, dflt.claim),
        jwks_file=r.get(j, "jwks_file", f"{at}.jwks_file", _nonempty, ""),
        jwks_url=r.get(j, "jwks_url", f"{at}.jwks_url", _jwks_url, ""),
        issuer=r.get(j, "issuer", f"{at}.issuer", _nonempty, ""),
        audience=r.get(j, "audience", f"{at}.audience", _audience, ()),
        algorithms=r.get(j, "algorithms", f"{at}.algorithms", _algorithms, dflt.algorithms),
        leeway=r.get(j, "leeway", f"{at}.leeway", parse_duration, dflt.leeway),
        refresh=r.get(j, "refresh", f"{at}.refresh", positive(parse_duration),
                      dflt.refresh))
    if bool(cfg.jwks_file) == bool(cfg.jwks_url):
        r.report(f"{at}: set exactly one of jwks_file, jwks_url")
    # Without them a token the same provider issued for another API, or another
    # provider's, would name a tenant here.
    for name in ("issuer", "audience"):
        if not j.get(name):
            r.report(f"{at}.{name}: missing (a token for another issuer or API must not "
                     "name a tenant here)")
    if cfg.leeway > 300:
        r.report(f"{at}.leeway: {format_duration(cfg.leeway)} is more than 5m: an expired "
                 "token would still name a tenant")
    return Tenant(mode=TenantMode.JWT, header="Authorization", missing=missing, jwt=cfg)


def _nonempty(value: object) -> str:
    text = str_(value)
    if not text:
        raise ValueError(f"{value!r} is empty")
    return text


def _jwks_url(value: object) -> str:
    text = _nonempty(value)
    if not text.startswith(("https://", "http://")):
        raise ValueError(f"{value!r} is not an http(s) URL")
    return text


def _audience(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or \
            not all(isinstance(a, str) and a for a in items):
        raise ValueError(f"{value!r} is not an audience or a list of them")
    return tuple(items)


def _algorithms(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or \
            not all(isinstance(a, str) and a in JWT_ALGORITHMS for a in value):
        raise ValueError(f"{value!r} is not a list of public-key JWT algorithms "
                         f"({', '.join(JWT_ALGORITHMS)})")
    return tuple(value)
