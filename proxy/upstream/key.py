"""The key idemproxy sends upstream (`routes[].upstream_key.header`).

Every attempt of one (scope, key) — the first send, a retry after a release status, a
takeover after a lease ran out — sends the same value, so an upstream that dedupes on a
key (Stripe's `Idempotency-Key`, Adyen's, PayPal's `PayPal-Request-Id`, an outbox table)
turns a re-send after an unknown outcome into a no-op. The scope holds the route and the
tenant, so two tenants' `order-1` send different values; the tenant part of the scope is
already a hash of the credential, so the value reveals no credential.

    value = hex(HMAC-SHA-256(secret, "idemproxy/upstream-key" 0x1f scope 0x1f key))

where `secret` is derived from the installation secret (proxy/sealing.py, kept in the
database, shared by every replica, independent of the encryption keys, so a key rotation
never changes the value mid-flight). `derive(..., secret=None)` is the plain SHA-256 of
the same message, for tools without a database. 64 hex characters: within every
provider's limit we know of (Adyen's is 64); the value cannot be recomputed from a
guessed client key without the secret.
"""

from __future__ import annotations

import hashlib
import hmac

_LABEL = b"idemproxy/upstream-key"


def derive(scope: str, key: str, *, secret: bytes | None) -> str:
    """The upstream's key for this scope and client key (see the module docstring)."""
    msg = b"\x1f".join((_LABEL, scope.encode("utf-8", "surrogateescape"),
                        key.encode("utf-8", "surrogateescape")))
    if secret:
        return hmac.new(secret, msg, hashlib.sha256).hexdigest()
    return hashlib.sha256(msg).hexdigest()
