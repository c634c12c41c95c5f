"""Configuration: the schema (frozen dataclasses) and `load`, which validates it once."""

from proxy.config.load import load, loads
from proxy.config.schema import (
    SAFE_METHODS,
    Admin,
    Client,
    Concurrent,
    Config,
    Database,
    Encryption,
    Fingerprint,
    JwtTenant,
    KeySource,
    Listen,
    Logging,
    MissingCredential,
    Pooler,
    Route,
    Sharding,
    StoreUnavailablePolicy,
    Tenant,
    TenantMode,
    Tracing,
    TrailingSlash,
    UnknownOutcome,
    Upstream,
    UpstreamKey,
    UpstreamTLS,
)

__all__ = [
    "SAFE_METHODS", "Admin", "Client", "Concurrent", "Config", "Database", "Encryption",
    "Fingerprint", "JwtTenant", "KeySource", "Listen", "Logging", "MissingCredential",
    "Pooler", "Route", "Sharding", "StoreUnavailablePolicy", "Tenant", "TenantMode",
    "Tracing", "TrailingSlash", "UnknownOutcome", "Upstream", "UpstreamKey", "UpstreamTLS",
    "load", "loads",
]
