"""Tenants from a verified identity (`tenant: {jwt: ...}`): the bearer token verified
against a JWKS, the principal its claim names. The one module that imports PyJWT.

    start-up  Identities.open(cfg): every JWKS the routes name loaded once (a file that
              cannot be read is a start-up error; a URL that does not answer is retried
              in the background, and its routes answer 503 until it does)
    request   principal(jwt, token): signature, alg, exp/nbf (with leeway), iss, aud and
              the claim, from the keys in memory: no I/O on the request's path
    refresh   one owned task re-reads every JWKS each `refresh`, and sooner (at most
              every MIN_REFRESH) after a token named a key id it does not hold yet

A key rotation is seen within `refresh`: an identity provider publishes a new key in its
JWKS before it signs with it, so a token signed by the new key finds it loaded; until
then such a token is a 401 (and its kid asks for an early refresh).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import jwt

from proxy.config import Config, JwtTenant, TenantMode
from proxy.errors import IdentityUnavailable, RuntimeFailure, TokenInvalid

log = logging.getLogger("idemproxy.identity")

MIN_REFRESH = 10.0  # seconds between two early refreshes asked for by unknown kids
FETCH_TIMEOUT = 10.0  # seconds for one JWKS download


class KeySet:
    """One JWKS (a file or a URL) and the keys last read from it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.loaded = False
        self.wanted = asyncio.Event()  # a token named a kid we do not hold
        self._last = 0.0

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    async def load(self) -> None:
        """Read the JWKS and swap the keys in; raises what reading or parsing raised."""
        text = await asyncio.to_thread(self._read)
        keyset = jwt.PyJWKSet.from_dict(json.loads(text))
        keys: dict[str | None, jwt.PyJWK] = {k.key_id: k for k in keyset.keys
                                              if k.public_key_use in (None, "sig")}
        if len(keys) == 1 and None not in keys:  # one key: tokens without a kid use it
            keys[None] = next(iter(keys.values()))
        self.keys, self.loaded, self._last = keys, True, time.monotonic()

    def _read(self) -> str:
        if not self.is_url:
            return Path(self.source).read_text()
        with urllib.request.urlopen(self.source, timeout=FETCH_TIMEOUT) as resp:  # noqa: S310
            return str(resp.read(2**20).decode())

    def ask_refresh(self) -> None:
        if time.monotonic() - self._last >= MIN_REFRESH:
            self.wanted.set()

    async def refresh_forever(self, every: float) -> None:
        """Re-read every `every` seconds, or sooner when asked; a failure keeps the keys
        already held (a JWKS endpoint's outage never turns valid tokens away)."""
        while True:
            # never loaded (a URL down at start-up): its routes answer 503, so try sooner
            wait = every if self.loaded else min(every, MIN_REFRESH)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wanted.wait(), wait)
            self.wanted.clear()
            await self.try_load()

    async def try_load(self) -> bool:
        try:
            await self.load()
        except Exception as exc:  # noqa: BLE001 - any failure to fetch or parse: keep the old
            log.error("JWKS %s could not be loaded: %s", self.source, _why(exc))
            self._last = time.monotonic()
            return False
        return True


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Identities:
    """Every JWKS the routes name, kept fresh by one owned task."""

    def __init__(self, sets: dict[str, KeySet], refresh: dict[str, float]) -> None:
        self.sets = sets
        self._refresh = refresh

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Config) -> AsyncIterator[Identities]:
        sets: dict[str, KeySet] = {}
        refresh: dict[str, float] = {}
        for route in cfg.routes:
            if route.tenant.mode is TenantMode.JWT:
                src = route.tenant.jwt.source
                sets.setdefault(src, KeySet(src))
                refresh[src] = min(refresh.get(src, route.tenant.jwt.refresh),
                                   route.tenant.jwt.refresh)
        for keyset in sets.values():
            if not await keyset.try_load() and not keyset.is_url:
                raise RuntimeFailure(f"the JWKS file {keyset.source} could not be read "
                                     "(see the log line above)")
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(ks.refresh_forever(refresh[src]))
                     for src, ks in sets.items()]
            try:
                yield cls(sets, refresh)
            finally:
                for task in tasks:
                    task.cancel()

    def principal(self, cfg: JwtTenant, token: str) -> str:
        """The verified claim of `token`, or TokenInvalid (401) saying why, or
        IdentityUnavailable (503) while the route's JWKS has never loaded."""
        keyset = self.sets[cfg.source]
        if not keyset.loaded:
            raise IdentityUnavailable("The keys that verify this route's tokens are not "
                                      "loaded yet; nothing was done. Retry shortly.")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise TokenInvalid("The bearer token is not a JWT.") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in cfg.algorithms:
            raise TokenInvalid(f"The bearer token is signed with {alg!r}; this route "
                               f"accepts {', '.join(cfg.algorithms)}.")
        key = keyset.keys.get(kid if isinstance(kid, str) else None)
        if key is None:
            keyset.ask_refresh()
            raise TokenInvalid("The bearer token is signed by a key the route's JWKS does "
                               "not hold.")
        return _claim(cfg, _decode(cfg, token, key, alg))


def _decode(cfg: JwtTenant, token: str, key: jwt.PyJWK, alg: str) -> dict[str, object]:
    try:
        claims: dict[str, object] = jwt.decode(
            token, key.key, algorithms=[alg], audience=list(cfg.audience),
            issuer=cfg.issuer, leeway=cfg.leeway,
            options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True})
    except jwt.ExpiredSignatureError:
        raise TokenInvalid("The bearer token has expired.") from None
    except jwt.ImmatureSignatureError:
        raise TokenInvalid("The bearer token is not valid yet (nbf or iat).") from None
    except jwt.InvalidAudienceError:
        raise TokenInvalid("The bearer token is for another audience.") from None
    except jwt.InvalidIssuerError:
        raise TokenInvalid("The bearer token is from another issuer.") from None
    except jwt.MissingRequiredClaimError as exc:
        raise TokenInvalid(f"The bearer token has no {exc.claim!r} claim.") from None
    except (jwt.InvalidTokenError, jwt.PyJWKError, ValueError, TypeError):
        raise TokenInvalid("The bearer token's signature does not verify.") from None
    return claims


def _claim(cfg: JwtTenant, claims: dict[str, object]) -> str:
    value = claims.get(cfg.claim)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise TokenInvalid(f"The bearer token has no {cfg.claim!r} claim naming a "
                           "principal.")
    return str(value)
