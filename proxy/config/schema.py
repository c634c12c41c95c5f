"""The configuration schema: frozen dataclasses whose field comments state the defaults.

Each default is stated here once: the loader takes the default of every field a file
leaves unset from these classes, and docs/configuration.md and docs/config.schema.json are
kept in step with them by tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from proxy.config.tracing import Tracing as Tracing  # re-exported: a section of Config
from proxy.paths import PathPattern

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


class Concurrent(enum.Enum):
    """What a retry gets while the first request with its key is still in flight."""

    REJECT = "reject"
    WAIT = "wait"


class UnknownOutcome(enum.Enum):
    """What happens to a key whose upstream call ended with no answer (timeout, reset)."""

    RETRY = "retry"  # keep the claim until its lease ends, then a retry forwards again
    FAIL = "fail"  # store the failure and replay it for the rest of the window
    # re-send at once with the same upstream_key (only with one): an upstream that dedupes
    # on it answers the first attempt's result (flow/execute.py, RESEND_ATTEMPTS)
    RESEND = "resend"


class StoreUnavailablePolicy(enum.Enum):
    """What a guarded request gets while Postgres is unreachable."""

    REJECT = "reject"  # 503 problem+json: fail closed
    PASS_THROUGH = "pass_through"  # forward unguarded, say so in a response header


class Pooler(enum.Enum):
    """What sits between the proxy and Postgres on `database.url`."""

    NONE = "none"  # Postgres itself, or a pooler in session mode
    TRANSACTION = "transaction"  # PgBouncer (or alike) in transaction mode: no session state


class Sharding(enum.Enum):
    """How the store's tables are laid out (docs/citus.md)."""

    NONE = "none"  # one PostgreSQL primary
    CITUS = "citus"  # a Citus cluster: distributed by key, single-key calls on the worker


class TenantMode(enum.Enum):
    AUTHORIZATION = "authorization"
    NONE = "none"
    HEADER = "header"
    JWT = "jwt"  # the claim of a verified bearer token (proxy/keys/identity.py)


class MissingCredential(enum.Enum):
    """What a guarded request without the route's tenant header gets."""

    REJECT = "reject"  # 400 problem+json naming the header: no shared anonymous scope
    SHARE = "share"  # every request without it shares one anonymous scope (opt-in)


class TrailingSlash(enum.Enum):
    """Whether `/v1/charges/` matches a route for `/v1/charges`."""

    IGNORE = "ignore"  # with or without one trailing slash, the same route
    STRICT = "strict"  # only as written


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                  "ES512", "EdDSA")  # public-key only: never none or a shared HS* secret


@dataclass(frozen=True, slots=True)
class JwtTenant:
    """`tenant: {jwt: ...}`: the tenant is a claim of the verified bearer token."""

    claim: str = "sub"  # default sub: the claim naming the principal
    jwks_file: str = ""  # a JWKS file (one of jwks_file, jwks_url)
    jwks_url: str = ""  # a JWKS URL, fetched at start-up and every `refresh`
    issuer: str = ""  # required: the `iss` the token must carry
    audience: tuple[str, ...] = ()  # required: the token's `aud` must name one of them
    algorithms: tuple[str, ...] = ("RS256",)  # default [RS256]
    leeway: float = 30.0  # default 30s of clock skew allowed on exp, nbf and iat
    refresh: float = 300.0  # default 5m between two reads of the JWKS

    @property
    def source(self) -> str:
        return self.jwks_file or self.jwks_url


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whose keys these are: keys only ever match inside route name + tenant."""

    mode: TenantMode = TenantMode.AUTHORIZATION  # default: HMAC of Authorization
    header: str = "Authorization"  # the header hashed for mode header (X-Api-Key, ...)
    missing: MissingCredential = MissingCredential.REJECT  # default reject: a 400
    # default false; true: `header` carries a principal an auth gateway set (the gateway
    # must strip the client's own copy), scoped like a verified JWT claim
    trusted: bool = False
    jwt: JwtTenant = JwtTenant()  # used with mode jwt only


@dataclass(frozen=True, slots=True)
class KeySource:
    """Where the key comes from: one of header, path parameter, body pointers or headers
    (headers and body may go together)."""

    header: str | None = "Idempotency-Key"  # default Idempotency-Key
    path: str | None = None  # default none; a {param} of match.path
    body: tuple[str, ...] = ()  # default none; JSON pointers (or /form-field names)
    bucket: float | None = None  # default none; seconds of the database clock folded in
    raw: bool = False  # default false: body keys are an HMAC; true: the one value itself
    # default none; several headers whose values, length-prefixed, are the key (with
    # `body`: the same values from the body when none of the headers is sent)
    headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Which parts of a request make its fingerprint (method and path always count)."""

    query: bool = True  # default true
    body: bool = True  # default true
    headers: tuple[str, ...] = ()  # default none; named request headers that count
    ignore: tuple[str, ...] = ()  # default none; JSON pointers dropped before hashing
    canonical_json: bool = False  # default false; key order and whitespace do not count


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    """A stable key sent upstream on every attempt of one (tenant, key) (upstream_key.py)."""

    header: str | None = None  # default none; e.g. Idempotency-Key for a Stripe-style API


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    methods: frozenset[str]
    path: PathPattern
    trailing_slash: TrailingSlash = TrailingSlash.IGNORE  # default ignore
    case_insensitive: bool = False  # default false: letters match in their case only
    key: KeySource = KeySource()  # default: the Idempotency-Key header
    preset: str | None = None  # default none; a name of config/presets.py's PRESETS
    require_key: bool = False  # default false: no key streams through unguarded
    tenant: Tenant = Tenant()  # default: HMAC of Authorization
    fingerprint: Fingerprint = Fingerprint()  # default: method, path, query and body
    ttl: float = 86400.0  # default 24h
    lock_timeout: float = 60.0  # default 60s: the lease of a claim
    concurrent: Concurrent = Concurrent.REJECT
    wait_timeout: float = 10.0  # default 10s
    # statuses (429) and classes ('5xx') passed on unstored, the key released; an integer
    # beats its class, in this list or in store_statuses (decide.on_answer)
    release_statuses: frozenset[int | str] = frozenset({408, 425, 429, 502, 503, 504})
    # default none: every status not released is stored; a list ([2xx]): only those are
    # stored, every other answer is released like release_statuses
    store_statuses: frozenset[int | str] | None = None
    unknown_outcome: UnknownOutcome = UnknownOutcome.RETRY
    max_request_body: int = 10 * 2**20  # default 10MiB
    max_stored_body: int = 100 * 2**20  # default 100MiB
    store_unavailable: StoreUnavailablePolicy = StoreUnavailablePolicy.REJECT
    replay_set_cookie: bool = False
    replay_header: str = "Idempotent-Replayed"  # default Idempotent-Replayed: true on replays
    expires_header: str | None = "Idempotency-Expires"  # default; null turns it off
    # default Idempotency-Body: `omitted` on a replay whose body was over max_stored_body
    omitted_header: str = "Idempotency-Body"
    mismatch_status: int = 422  # default 422; 409 or 400 for clients that read 422 otherwise
    # default none: UUIDv7 keys older than this are refused (keys/age.py), like requests
    # whose Repeatability-First-Sent is older than ttl
    max_key_age: float | None = None
    stale_status: int = 412  # default 412 (OASIS repeatability); 409, 400 or 422 instead
    upstream: str = ""  # default: the top-level upstream; else a URL or an `upstreams` name
    upstream_key: UpstreamKey = UpstreamKey()  # default: no key sent to the upstream


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost") or self.host.startswith("127.")


@dataclass(frozen=True, slots=True)
class Admin:
    listen: Listen = Listen("127.0.0.1", 9090)
    token_env: str = "IDEMPROXY_ADMIN_TOKEN"  # bearer token for mutating admin calls


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """TLS to an https:// upstream (proxy/upstream/tls.py)."""

    ca_file: str = ""  # default none: the system's trust store
    cert_file: str = ""  # default none: no client certificate (mTLS when set)
    key_file: str = ""  # default none: the key is in cert_file
    server_name: str = ""  # default: the URL's host, as SNI and in the certificate check
    verify: bool = True  # false: the certificate is not checked (a loud start-up warning)


@dataclass(frozen=True, slots=True)
class Upstream:
    url: str = "http://127.0.0.1:9000"
    connect_timeout: float = 5.0
    timeout: float = 30.0  # whole upstream exchange, response body included
    max_connections: int = 100
    tls: UpstreamTLS = UpstreamTLS()
    # default true: Location / Content-Location on this upstream's origin are rewritten
    # to the client's before they are stored (proxy/http/forwarded.py)
    rewrite_location: bool = True


@dataclass(frozen=True, slots=True)
class Client:
    """Limits on the proxied port's clients, so slow or idle ones cannot hold it."""

    header_timeout: float = 10.0  # default 10s: a connection's first byte to its last header
    body_timeout: float = 30.0  # default 30s: at most between two reads of a request body
    keepalive_timeout: float = 75.0  # default 75s: an idle connection between requests
    # default 30s: the longest a write to the client may make no progress (the client
    # reads nothing) before the connection is ended, so a reader that never reads cannot
    # hold a key, a database connection or an upstream connection
    write_timeout: float = 30.0
    max_connections: int = 10000  # default 10000 open client connections per process
    max_body_memory: int = 256 * 2**20  # default 256MiB of request bodies held at once


@dataclass(frozen=True, slots=True)
class Database:
    url: str = ""  # empty: embedded PostgreSQL under data_dir
    pool_min: int = 2
    pool_max: int = 10
    timeout: float = 5.0  # per statement; past it the store counts as unavailable
    pooler: Pooler = Pooler.NONE  # transaction: url is a transaction-mode pooler
    listen_url: str = ""  # direct URL for LISTEN; empty: url (none), no LISTEN (transaction)
    sharding: Sharding = Sharding.NONE  # citus: url is a Citus coordinator (docs/citus.md)


@dataclass(frozen=True, slots=True)
class Encryption:
    # the environment variable holding the keys, `ID:BASE64` comma-separated; the first
    # seals new records, all open them; unset or empty: stored answers are not encrypted
    keys_env: str = "IDEMPROXY_ENCRYPTION_KEYS"


@dataclass(frozen=True, slots=True)
class Logging:
    format: str = "json"  # json | text
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    listen: Listen = Listen("0.0.0.0", 8080)
    admin: Admin = Admin()
    upstream: Upstream = Upstream()
    client: Client = Client()
    # named upstreams for routes[].upstream (a route's URL is here too, under the URL)
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    database: Database = Database()
    routes: tuple[Route, ...] = ()
    data_dir: str = "./.idemproxy"
    workers: int = 1  # default auto: the cores available (workers: auto); 1 = one process
    shutdown_grace: float = 30.0
    sweep_interval: float = 60.0
    replay_cache: int = 16 * 1024 * 1024  # bytes of completed responses kept per process
    logging: Logging = Logging()
    tracing: Tracing = Tracing()
    encryption: Encryption = Encryption()
    allow_python_parser: bool = False  # refuse to start without aiohttp's C parser
    # default none: clients (CIDRs) whose X-Forwarded-* are kept and appended to; from
    # anyone else they are replaced by what the proxy saw (proxy/http/forwarded.py)
    trusted_proxies: tuple[str, ...] = ()
    source: str = field(default="<defaults>", compare=False)
    # Not a field: what check-config prints and serve logs about a config that loads but
    # looks wrong (a partly shadowed route, a lease longer than the window, ...).
    warnings: tuple[str, ...] = field(default=(), compare=False)


