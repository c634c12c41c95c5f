"""Pure units of proxy/sealing.py: key parsing, sealing bound to its record, keyed hashes."""

from __future__ import annotations

import base64
import hashlib
import uuid

import pytest

from proxy.config import loads
from proxy.errors import ConfigError, StoredAnswerUnreadable
from proxy.sealing import (
    BODY,
    CHUNK,
    HEADERS,
    Sealer,
    fingerprint_key_id,
    generate_key,
    parse_keys,
    sealed_by,
)

K1 = "k1:" + base64.b64encode(b"\x01" * 32).decode()
K2 = "k2:" + base64.b64encode(b"\x02" * 32).decode()
SECRET = b"s" * 32
TOKEN = uuid.UUID(int=7)
WHERE = {"scope": "charges:ab", "key": "order-1", "token": TOKEN}


def sealer(keys: str = K1, secret: bytes = SECRET, seen: list[str] | None = None) -> Sealer:
    return Sealer(keys=parse_keys(keys, source="test"), installation_secret=secret,
                  on_unreadable=(seen.append if seen is not None else None))


def test_keys_parse_in_order_first_is_primary() -> None:
    """Keys are ID:BASE64 comma-separated; the first listed seals."""
    s = sealer(f"{K2}, {K1}")
    assert [k.id for k in s.keys] == ["k2", "k1"]
    assert s.primary is not None and s.primary.id == "k2"


@pytest.mark.parametrize("text, says", [
    ("k1", "not ID:BASE64"),
    ("k 1:AAAA", "not ID:BASE64"),
    ("k1:not base64!", "not valid base64"),
    ("k1:" + base64.b64encode(b"x" * 16).decode(), "16 bytes"),
    (f"{K1},{K1}", "listed twice"),
])
def test_bad_keys_are_config_errors_without_material(text: str, says: str) -> None:
    """A malformed key list names the problem and never quotes key material."""
    with pytest.raises(ConfigError) as exc:
        parse_keys(text, source="$IDEMPROXY_ENCRYPTION_KEYS")
    message = str(exc.value)
    assert says in message and "$IDEMPROXY_ENCRYPTION_KEYS" in message
    assert base64.b64encode(b"\x01" * 32).decode() not in message


def test_no_keys_means_no_encryption() -> None:
    """Without keys, pieces are stored as they are and fingerprints stay plain SHA-256."""
    s = sealer("")
    assert not s.encrypting
    assert s.seal(b"data", kind=BODY, **WHERE) == b"data"
    digest = hashlib.sha256(b"x").digest()
    assert s.fingerprint(digest) == digest


def test_seal_round_trip_fresh_nonce_and_key_id() -> None:
    """A sealed piece opens to its plaintext, names its key, and differs each time."""
    s = sealer()
    a = s.seal(b"marker", kind=HEADERS, **WHERE)
    b = s.seal(b"marker", kind=HEADERS, **WHERE)
    assert a != b and b"marker" not in a
    assert sealed_by(a) == "k1"
    assert s.open(a, kind=HEADERS, **WHERE) == b"marker"


@pytest.mark.parametrize("change", [
    {"scope": "charges:cd"}, {"key": "order-2"}, {"token": uuid.UUID(int=8)},
    {"kind": BODY}, {"seq": 1},
])
def test_a_piece_is_bound_to_its_record_kind_and_chunk(change: dict[str, object]) -> None:
    """A piece opened as another record's, another kind or another chunk number fails."""
    s = sealer()
    blob = s.seal(b"chunk", kind=CHUNK, seq=0, **WHERE)
    where: dict[str, object] = {"kind": CHUNK, "seq": 0, **WHERE, **change}
    with pytest.raises(StoredAnswerUnreadable):
        s.open(blob, **where)  # type: ignore[arg-type]


def test_flipped_byte_and_missing_key_are_unreadable_and_counted() -> None:
    """An altered piece or one sealed by an unlisted key raises, counted by key id."""
    seen: list[str] = []
    s = sealer(seen=seen)
    blob = bytearray(s.seal(b"body", kind=BODY, **WHERE))
    blob[-1] ^= 1
    with pytest.raises(StoredAnswerUnreadable) as exc:
        s.open(bytes(blob), kind=BODY, **WHERE)
    assert exc.value.key_id == "k1" and exc.value.status == 500
    other = sealer(K2, seen=seen)
    with pytest.raises(StoredAnswerUnreadable):
        other.open(s.seal(b"body", kind=BODY, **WHERE), kind=BODY, **WHERE)
    assert seen == ["k1", "k1"]


def test_a_key_id_cannot_be_swapped() -> None:
    """Relabelling a piece with another configured key's id does not open it."""
    s = sealer(f"{K1},{K2}")
    blob = s.seal(b"body", kind=BODY, **WHERE)
    forged = blob.replace(b"k1", b"k2", 1)
    with pytest.raises(StoredAnswerUnreadable):
        s.open(forged, kind=BODY, **WHERE)


def test_rotation_old_key_still_opens() -> None:
    """After a new key is put first, pieces sealed by the old one still open."""
    old = sealer(K1).seal(b"body", kind=BODY, **WHERE)
    rotated = sealer(f"{K2},{K1}")
    assert rotated.open(old, kind=BODY, **WHERE) == b"body"
    assert sealed_by(rotated.seal(b"body", kind=BODY, **WHERE)) == "k2"


def test_fingerprints_are_keyed_and_match_across_rotation() -> None:
    """A keyed fingerprint is not the SHA-256, and is recomputed under the record's key."""
    digest = hashlib.sha256(b"amount=2000&currency=usd").digest()
    before = sealer(K1).fingerprint(digest)
    assert digest not in before and fingerprint_key_id(before) == "k1"
    rotated = sealer(f"{K2},{K1}")
    assert rotated.fingerprint(digest) != before
    assert rotated.fingerprint_as(before, digest) == before
    assert rotated.fingerprint_as(digest, digest) == digest  # a plain, pre-key record
    assert sealer(K2).fingerprint_as(before, digest) is None  # k1 no longer listed


def test_tenant_hash_is_keyed_by_the_installation() -> None:
    """The tenant hash is not the plain SHA-256 and differs between installations."""
    cred = b"Bearer guess"
    plain = hashlib.sha256(cred).hexdigest()[:32]
    a = sealer("").tenant_hash(cred)
    assert a != plain and len(a) == 32
    assert a == sealer(K1).tenant_hash(cred)  # independent of the encryption keys
    assert a != sealer("", secret=b"t" * 32).tenant_hash(cred)


def test_key_hash_keyed_by_primary_key() -> None:
    """key_hash in logs is neither the plain SHA-256 nor the same under another key."""
    plain = hashlib.sha256(b"charges:ab\x1forder-1").hexdigest()[:16]
    hashes = {sealer(k).key_hash("charges:ab", "order-1") for k in ("", K1, K2)}
    assert len(hashes) == 3 and plain not in hashes


def test_generated_keys_parse() -> None:
    """`keys generate` material is 32 random bytes in base64."""
    assert len(parse_keys("new:" + generate_key(), source="test")) == 1


def test_config_checks_the_keys_variable() -> None:
    """encryption.keys_env is validated by the loader, naming the field and the variable."""
    text = "encryption:\n  keys_env: MY_KEYS\nroutes: []\n"
    assert loads(text, env={"MY_KEYS": K1}).encryption.keys_env == "MY_KEYS"
    with pytest.raises(ConfigError, match=r"encryption.keys_env: \$MY_KEYS: key 1"):
        loads(text, env={"MY_KEYS": "k1:short"})
    with pytest.raises(ConfigError, match="encryption.keys_env"):
        loads("encryption:\n  keys_env: 'not a name'\n", env={})


@pytest.mark.parametrize("key_len", [0, 1, 32, 63, 64, 65, 200])
@pytest.mark.parametrize("msg", [b"", b"Bearer loadtest", bytes(range(256)) * 5])
def test_the_precomputed_mac_is_hmac_sha256(key_len: int, msg: bytes) -> None:
    """sealing.Mac gives hmac.new(key, msg, sha256)'s digest for keys shorter than,
    equal to and longer than the block, and for any message, again and again."""
    import hmac

    from proxy.sealing import Mac

    key = bytes((i * 7 + 3) % 256 for i in range(key_len))
    mac = Mac(key)
    want = hmac.new(key, msg, hashlib.sha256)
    for _ in range(2):  # its states are copied, never consumed
        assert mac.digest(msg) == want.digest()
        assert mac.hexdigest(msg) == want.hexdigest()
