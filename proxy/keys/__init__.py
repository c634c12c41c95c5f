"""Keys: where a request's idempotency key comes from (header, path parameter, body),
whose it is (the tenant scope), and what makes two requests the same (the fingerprint);
JSON and form bodies as they read them. Pure: no socket, no clock, no store."""

from proxy.keys.age import check_age
from proxy.keys.composite import read_key
from proxy.keys.fingerprint import fingerprint
from proxy.keys.sources import (
    MAX_KEY_LENGTH,
    NoBodyValue,
    body_key,
    canonical_json,
    check_key,
    header_values,
    key_from_headers,
    parse_json,
    parse_key_value,
    require,
    resolve_pointer,
    select,
)
from proxy.keys.tenant import (
    ANONYMOUS,
    normalize_credential,
    principal_hash,
    scope_of,
    tenant_hash,
    tenant_of,
)

__all__ = [
    "ANONYMOUS", "MAX_KEY_LENGTH", "NoBodyValue", "body_key", "canonical_json", "check_age",
    "check_key",
    "fingerprint", "header_values", "key_from_headers", "normalize_credential",
    "parse_json", "parse_key_value", "principal_hash", "read_key", "require",
    "resolve_pointer", "scope_of", "select", "tenant_hash", "tenant_of",
]
