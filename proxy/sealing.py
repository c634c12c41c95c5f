"""Data at rest: stored answers sealed with AES-256-GCM, and the keyed hashes.

    IDEMPROXY_ENCRYPTION_KEYS="k2:<base64 of 32 random bytes>,k1:<...>"

The first key seals new records; every key listed opens them. What is sealed: a record's
headers, its inline body and each body chunk, every piece with a fresh 96-bit nonce and
the record's scope, key, lock token, the key id, and the piece's kind and chunk number as
associated data, so a piece cannot be moved to another record, another chunk number or
another key id without failing to open. A sealed piece is self-describing:

    0x00 0x01 | len(key id) | key id | nonce (12) | ciphertext + tag (16)

The leading 0x00 never starts plaintext headers (`name: value\\r\\n` lines), and every
completed record stores headers (sealed even when empty), so a record's headers tell
whether it was sealed and by which key; its body and chunks were sealed by the same
writer with the same key (re-encryption rewrites them together).

Keyed hashes (HMAC-SHA-256), so a dump or a log line gives nothing to test guesses on:

- the tenant hash in scopes, logs and the admin API, under a secret of the installation
  (generated once by migration 0006, kept in the database): stable across restarts,
  replicas and key rotation, with or without encryption keys;
- fingerprints, with keys set, under a key derived from the primary key, stored as
  `0x01 | len(key id) | key id | mac`, so a record's fingerprint still matches after
  rotation (the flow recomputes it under the record's own key); plain 32-byte SHA-256
  without keys;
- `key_hash` in logs, under a key derived from the primary key (the installation secret
  without keys).

The `cryptography` package lives here only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from uuid import UUID

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.errors import ConfigError, StoredAnswerUnreadable

log = logging.getLogger("idemproxy.sealing")

SEALED = b"\x00\x01"  # prefix of a sealed piece (format version 1)
KEYED_FP = 0x01  # first byte of a keyed fingerprint
NONCE = 12
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")

HEADERS, BODY, CHUNK = b"h", b"b", b"c"  # the kinds of piece, bound into the AD


@dataclass(frozen=True, slots=True)
class DataKey:
    """One configured key: its id, and the keys derived from it."""

    id: str
    aead: AESGCM
    fp_key: bytes  # fingerprints
    log_key: bytes  # key_hash in logs


class Mac:
    """HMAC-SHA-256 under one key with its two padded key blocks hashed once (RFC 2104):
    the digest hmac.new(key, msg, sha256) gives, for a third of its CPU (OpenSSL sets an
    HMAC up again on every call; two hash-state copies are cheaper). Per request: the
    tenant and the log key hash, and the fingerprint when keys are set."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > _BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK, b"\0")
        self._inner = hashlib.sha256(key.translate(hmac.trans_36))
        self._outer = hashlib.sha256(key.translate(hmac.trans_5C))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def hexdigest(self, msg: bytes) -> str:
        return self.digest(msg).hex()


_BLOCK = 64  # SHA-256's block size


def _derive(secret: bytes, purpose: str) -> bytes:
    """A sub-key for one purpose (HMAC as a PRF, as HKDF-Expand does for one block)."""
    return hmac.new(secret, b"idemproxy/" + purpose.encode() + b"\x01",
                    hashlib.sha256).digest()


def parse_keys(text: str, *, source: str) -> tuple[DataKey, ...]:
    """`ID:BASE64[,ID:BASE64...]`, each key 32 bytes; raises ConfigError naming `source`.

    Errors never quote a key's material."""
    keys: list[DataKey] = []
    problems: list[str] = []
    for n, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        kid, sep, b64 = item.partition(":")
        where = f"{source}: key {n + 1}"
        if not sep or not KEY_ID.match(kid):
            problems.append(f"{where} is not ID:BASE64 with an ID of 1-32 letters, digits, "
                            "'_', '.' or '-'")
            continue
        try:
            raw = base64.b64decode(b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"{where} ({kid}) is not valid base64")
            continue
        if len(raw) != 32:
            problems.append(f"{where} ({kid}) is {len(raw)} bytes; AES-256 needs 32 "
                            "(generate one with `idemproxy keys generate`)")
            continue
        if any(k.id == kid for k in keys):
            problems.append(f"{where}: the id {kid} is listed twice")
            continue
        keys.append(DataKey(kid, AESGCM(raw), _derive(raw, "fingerprint"),
                            _derive(raw, "log")))
    if problems:
        raise ConfigError(problems)
    return tuple(keys)


def keys_from_env(env_name: str, environ: Mapping[str, str] | None = None
                  ) -> tuple[DataKey, ...]:
    """The keys in the environment variable `encryption.keys_env` names (none if unset)."""
    return parse_keys((environ if environ is not None else os.environ).get(env_name, ""),
                      source=f"${env_name}")


def generate_key() -> str:
    """A fresh key's material, base64 (for `idemproxy keys generate`)."""
    return base64.b64encode(os.urandom(32)).decode()


def _lp(part: bytes) -> bytes:
    return len(part).to_bytes(4, "big") + part


def _ad(kind: bytes, seq: int, scope: str, key: str, token: UUID, key_id: str) -> bytes:
    return b"".join((b"idemproxy-seal/1", _lp(kind), seq.to_bytes(8, "big"),
                     _lp(scope.encode("utf-8", "surrogateescape")),
                     _lp(key.encode("utf-8", "surrogateescape")), token.bytes,
                     _lp(key_id.encode())))


def sealed_by(blob: bytes | None) -> str | None:
    """The id of the key that sealed a piece; None for plaintext."""
    if not blob or not blob.startswith(SEALED) or len(blob) < 3:
        return None
    n = blob[2]
    return blob[3:3 + n].decode("ascii", "replace")


class Sealer:
    """Seals and opens stored pieces and computes the keyed hashes of one installation.

    `on_unreadable(key_id)` is called once for each piece that cannot be opened (a
    metric); the error line names the key id, never the key.
    """

    def __init__(self, *, keys: tuple[DataKey, ...], installation_secret: bytes,
                 on_unreadable: Callable[[str], None] | None = None) -> None:
        if len(installation_secret) < 16:
            raise ValueError("the installation secret is missing or too short")
        self.keys = keys
        self._by_id = {k.id: k for k in keys}
        self.primary: DataKey | None = keys[0] if keys else None
        self._tenant_mac = Mac(_derive(installation_secret, "tenant"))
        # routes[].upstream_key (proxy/upstream/key.py): under the installation secret,
        # not a data key, so it stays the same across key rotation mid-flight.
        self.upstream_key_secret = _derive(installation_secret, "upstream-key")
        # routes[].key.body: the stored key of a content-derived key. Under the
        # installation secret too: it is looked up, so it must outlive key rotation.
        self._body_mac = Mac(_derive(installation_secret, "body-key"))
        self._log_mac = Mac(self.primary.log_key if self.primary else _derive(
            installation_secret, "log"))
        self._fp_macs = {k.id: Mac(k.fp_key) for k in keys}
        self.on_unreadable = on_unreadable or (lambda key_id: None)

    @property
    def encrypting(self) -> bool:
        return self.primary is not None

    # --- sealing ---------------------------------------------------------------------

    def seal(self, data: bytes, *, kind: bytes, scope: str, key: str, token: UUID,
             seq: int = 0) -> bytes:
        """`data` sealed under the primary key (unchanged when no keys are set)."""
        k = self.primary
        if k is None:
            return data
        nonce = os.urandom(NONCE)
        ad = _ad(kind, seq, scope, key, token, k.id)
        head = SEALED + bytes((len(k.id),)) + k.id.encode()
        return head + nonce + k.aead.encrypt(nonce, data, ad)

    def open(self, blob: bytes, *, kind: bytes, scope: str, key: str, token: UUID,
             seq: int = 0) -> bytes:
        """The plaintext of a sealed piece; raises StoredAnswerUnreadable if its key is not
        configured or it was altered."""
        kid = sealed_by(blob) or "?"
        kid = kid if KEY_ID.match(kid) else "?"  # a metric label and a log field
        k = self._by_id.get(kid)
        if k is None:
            raise self._unreadable(kid, scope, "its key is not configured")
        start = 3 + len(kid)
        nonce, ct = blob[start:start + NONCE], blob[start + NONCE:]
        try:
            return k.aead.decrypt(nonce, ct, _ad(kind, seq, scope, key, token, kid))
        except (InvalidTag, ValueError):
            raise self._unreadable(kid, scope, "it fails authentication (altered, or "
                                   "moved from another record)") from None

    def fingerprint_unreadable(self, stored: bytes, *, scope: str) -> StoredAnswerUnreadable:
        """The error for a record whose fingerprint's key is no longer configured."""
        return self._unreadable(fingerprint_key_id(stored) or "?", scope,
                                "its fingerprint's key is not configured")

    def _unreadable(self, kid: str, scope: str, why: str) -> StoredAnswerUnreadable:
        self.on_unreadable(kid)
        log.error("stored answer cannot be opened", extra={"fields": {
            "route": scope.split(":", 1)[0], "key_id": kid, "reason": why}})
        return StoredAnswerUnreadable(
            f"The stored answer for this key cannot be read (sealed with key {kid!r}: "
            f"{why}). The request was not executed again.", key_id=kid)

    # --- keyed hashes ----------------------------------------------------------------

    def tenant_hash(self, material: bytes) -> str:
        """The tenant's name in scopes and logs: 32 hex digits of an HMAC under the
        installation secret (a guessed credential cannot be checked without it)."""
        return self._tenant_mac.hexdigest(material)[:32]

    def body_key(self, material: bytes) -> str:
        """A content-derived key (64 hex digits): an HMAC under the installation secret,
        so a stored key cannot be used to test guessed body values offline."""
        return self._body_mac.hexdigest(material)

    def key_hash(self, scope: str, key: str) -> str:
        """The key's name in log lines: 16 hex digits of a keyed HMAC."""
        return self._log_mac.hexdigest(
            f"{scope}\x1f{key}".encode("utf-8", "surrogateescape"))[:16]

    def fingerprint(self, digest: bytes) -> bytes:
        """What is stored for a request's SHA-256 `digest`: keyed under the primary key."""
        return self._keyed_fp(self.primary, digest)

    def fingerprint_as(self, stored: bytes, digest: bytes) -> bytes | None:
        """`digest` under the derivation `stored` was made with (another key, or plain),
        to compare a record fingerprinted before a rotation; None if that key is gone."""
        if len(stored) == 32:
            return digest
        if not stored or stored[0] != KEYED_FP or len(stored) < 2:
            return None
        k = self._by_id.get(stored[2:2 + stored[1]].decode("ascii", "replace"))
        return None if k is None else self._keyed_fp(k, digest)

    def _keyed_fp(self, k: DataKey | None, digest: bytes) -> bytes:
        if k is None:
            return digest
        mac = self._fp_macs[k.id].digest(digest)
        return bytes((KEYED_FP, len(k.id))) + k.id.encode() + mac


def fingerprint_key_id(stored: bytes) -> str | None:
    """The key id a stored fingerprint was keyed with; None for a plain one."""
    if len(stored) > 2 and stored[0] == KEYED_FP and len(stored) != 32:
        return stored[2:2 + stored[1]].decode("ascii", "replace")
    return None
