"""Configuration: the schema (frozen dataclasses) and `load`, which validates it once."""

from proxy.config.load import load, loads
from proxy.config.schema import (
    SAFE_METHODS,
    Admin,
    Concurrent,
    Config,
    Database,
    Encryption,
    Fingerprint,
    KeySource,
    Listen,
    Logging,
    Pooler,
    Route,
    StoreUnavailablePolicy,
    Tenant,
    TenantMode,
    UnknownOutcome,
    Upstream,
)

__all__ = [
    "SAFE_METHODS", "Admin", "Concurrent", "Config", "Database", "Encryption", "Fingerprint",
    "KeySource", "Listen", "Logging", "Pooler", "Route", "StoreUnavailablePolicy", "Tenant",
    "TenantMode",
    "UnknownOutcome", "Upstream", "load", "loads",
]
