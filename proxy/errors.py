"""The error tree. Every error a client can see is a `ProblemError` defined here.

    IdemproxyError
    ├── ConfigError                 bad YAML config (never reaches a client)
    ├── UsageError                  the command line cannot work (CLI: exit 2)
    ├── RuntimeFailure              an expected failure at run time (CLI: exit 1)
    ├── SchemaNotCurrent            the database needs `idemproxy migrate` (CLI: exit 1)
    ├── StoreError                  anything the store failed at (store/ raises nothing else):
    │   │                           503 before the upstream was called; after it answered,
    │   │                           the completion is retried until it lands
    │   ├── StoreUnavailable        Postgres unreachable, timed out, or not a primary
    │   └── StoreFailed             the server refused the statement (any other SQLSTATE)
    ├── UpstreamError               the upstream leg failed; carries the problem to answer
    └── ProblemError                rendered as RFC 9457 application/problem+json
        ├── BadRequest              400 malformed framing, headers or admin query
        ├── KeyMissing              400 route has require_key and no key was found
        ├── KeyMalformed            400 empty, too long, non-printable, several key headers
        ├── CredentialMissing       400 no tenant header on a route scoped by it
        ├── UpgradeRefused          400 a protocol upgrade (WebSocket) on a guarded route
        ├── AdminUnauthorized       401 admin beyond loopback without its bearer token
        ├── TokenInvalid            401 a route's tenant JWT is invalid or expired
        ├── NotFound                404 no such admin path or key
        ├── MethodNotAllowed        405 admin path without that method
        ├── HeaderTimeout           408 the request head did not arrive in time
        ├── BodyTimeout             408 the client stopped sending its request body
        ├── KeyInFlight             409 the first request with this key is still running
        ├── BodyTooLarge            413 request body over max_request_body
        ├── KeyReused               422 same key, different fingerprint (mismatch_status)
        ├── RetryTooOld             412 first sent (or UUIDv7 key made) before the window
        ├── HTTPProblem             any other status aiohttp itself answered (admin)
        ├── InternalError           500 a bug: logged with its traceback, never shown
        ├── StoredAnswerUnreadable  500 a sealed record cannot be opened (never re-executed)
        ├── MethodNotSupported      501 CONNECT: the proxy is no forward proxy
        ├── UpstreamUnreachable     502 connection refused: the request was never sent
        ├── UpstreamTLSFailed       502 TLS handshake or certificate failed: never sent
        ├── UpstreamFailed          502 reset after sending: outcome unknown
        ├── ServiceUnavailable      503 the store is down and the route fails closed
        ├── ProxyBusy               503 request-body memory (client.max_body_memory) is full
        ├── Draining                503 this replica drains: no new claims (lifecycle.py)
        ├── IdentityUnavailable     503 a route's JWKS has not loaded yet (identity.py)
        └── UpstreamTimeout         504 no answer in time: outcome unknown

Foreign exceptions are translated at exactly one boundary each: asyncpg's in `store/`
(to `StoreError`), the upstream clients' in `forward.py` (to `UpstreamError`). Internal
failures become answers here, in one function each: `store_unavailable()` and
`UpstreamError.problem`. `ProblemError.body()` is the one problem+json renderer;
`framing.problem_response` the one place it becomes an HTTP response.
"""

from __future__ import annotations

import json

ERROR_BASE = "https://idemproxy.dev/errors/"
PROBLEM_JSON = "application/problem+json"


class IdemproxyError(Exception):
    """Base of every error idemproxy raises on purpose."""


class ConfigError(IdemproxyError):
    """The configuration is invalid; `problems` lists every `field.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UsageError(IdemproxyError):
    """The command line (or the environment it reads) cannot work: exit 2."""


class RuntimeFailure(IdemproxyError):
    """A clear, expected failure at run time (a port in use, no database yet): exit 1."""


class SchemaNotCurrent(IdemproxyError):
    """The database has not been migrated to the version this code needs."""


class StoreError(IdemproxyError):
    """A store call failed; the flow sees only this family, never a driver's exception.

    Whatever the cause, nothing the call would have written is visible: the statement's
    transaction was rolled back, or never reached the server."""


class StoreUnavailable(StoreError):
    """The database could not be reached, did not answer in time, or is not (or no longer)
    a primary that accepts writes."""


class StoreFailed(StoreError):
    """The database refused the statement: a serialization failure, a statement timeout,
    a full disk, a prepared-statement error, an error raised by a trigger, ..."""


class ProblemError(IdemproxyError):
    """An error answered to the client as application/problem+json."""

    status: int = 500
    slug: str = "internal"
    title: str = "Internal error"
    # What the SDKs' retry hints say (RETRY_HINTS): True for "nothing was done, the same
    # request later will work", False for a definite answer, None for no hint.
    retry: bool | None = None

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None,
                 close: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.close = close  # the connection's byte stream cannot be trusted any more

    @property
    def type_uri(self) -> str:
        return ERROR_BASE + self.slug

    def body(self, *, instance: str | None = None) -> bytes:
        """The RFC 9457 document: type, title, status, detail (and instance if given)."""
        doc: dict[str, object] = {
            "type": self.type_uri,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        return json.dumps(doc).encode()


class BadRequest(ProblemError):
    status = 400
    slug = "bad-request"
    title = "Malformed request"


class KeyMissing(ProblemError):
    status = 400
    slug = "key-missing"
    title = "Idempotency key required"


class KeyMalformed(ProblemError):
    status = 400
    slug = "key-malformed"
    title = "Malformed idempotency key"


class AdminUnauthorized(ProblemError):
    status = 401
    slug = "unauthorized"
    title = "Admin token required"


class NotFound(ProblemError):
    status = 404
    slug = "not-found"
    title = "Not Found"


class MethodNotAllowed(ProblemError):
    status = 405
    slug = "method-not-allowed"
    title = "Method Not Allowed"


class MethodNotSupported(ProblemError):
    status = 501
    slug = "method-not-supported"
    title = "Method not supported"


class UpgradeRefused(ProblemError):
    status = 400
    slug = "upgrade-refused"
    title = "Protocol upgrade on a guarded route"


class CredentialMissing(ProblemError):
    status = 400
    slug = "credential-missing"
    title = "Credential required for the idempotency scope"


class TokenInvalid(ProblemError):
    """A route scoped by a JWT claim got a token that does not verify: never a new scope
    (RFC 6750 §3: 401 with a Bearer challenge). No retry hint: the same token will fail
    again, a refreshed one may not."""

    status = 401
    slug = "token-invalid"
    title = "Invalid bearer token for the idempotency scope"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


class IdentityUnavailable(ProblemError):
    status = 503
    slug = "identity-unavailable"
    title = "Token verification keys unavailable"
    retry = True  # nothing was claimed or forwarded


class HeaderTimeout(ProblemError):
    status = 408
    slug = "header-timeout"
    title = "Request header timed out"


class BodyTimeout(ProblemError):
    status = 408
    slug = "body-timeout"
    title = "Request body timed out"


class KeyInFlight(ProblemError):
    status = 409
    slug = "key-in-flight"
    title = "A request with this idempotency key is in progress"
    retry = True


class BodyTooLarge(ProblemError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"


class KeyReused(ProblemError):
    status = 422
    slug = "key-reused"
    title = "Idempotency key reused with a different request"
    retry = False  # whatever its status (mismatch_status may be 409): never retry it

    def __init__(self, detail: str, *, status: int = 422,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status = status  # routes[].mismatch_status: 409 or 400 for some clients


class RetryTooOld(ProblemError):
    status = 412
    slug = "retry-too-old"
    title = "Retry older than the key's window"
    retry = False  # the same request later is older still

    def __init__(self, detail: str, *, status: int = 412) -> None:
        super().__init__(detail)
        self.status = status  # routes[].stale_status


class HTTPProblem(ProblemError):
    """A status aiohttp answered by itself (say 413 on the admin port), as a problem."""

    slug = "http-error"

    def __init__(self, status: int, title: str, detail: str, *,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status, self.title = status, title


class InternalError(ProblemError):
    status = 500
    slug = "internal"
    title = "Internal error"


class StoredAnswerUnreadable(ProblemError):
    """A stored record's key is not configured or its ciphertext was altered: an error,
    never a reason to execute the request again (proxy/sealing.py)."""

    status = 500
    slug = "stored-answer-unreadable"
    title = "Stored answer cannot be read"

    def __init__(self, detail: str, *, key_id: str) -> None:
        super().__init__(detail)
        self.key_id = key_id


class UpstreamUnreachable(ProblemError):
    status = 502
    slug = "upstream-unreachable"
    title = "Upstream unreachable"


class UpstreamTLSFailed(ProblemError):
    status = 502
    slug = "upstream-tls-failed"
    title = "TLS to the upstream failed"


class UpstreamFailed(ProblemError):
    status = 502
    slug = "upstream-failed"
    title = "Upstream failed after the request was sent"


class ServiceUnavailable(ProblemError):
    status = 503
    slug = "store-unavailable"
    title = "Idempotency store unavailable"
    retry = True


class UpstreamTimeout(ProblemError):
    status = 504
    slug = "upstream-timeout"
    title = "Upstream timed out"


class ProxyBusy(ProblemError):
    status = 503
    slug = "proxy-busy"
    title = "Too many request bodies in progress"
    retry = True


class Draining(ProblemError):
    status = 503
    slug = "draining"
    title = "Proxy draining"
    retry = True  # nothing was claimed: another replica, or this one later, takes it


class UpstreamError(IdemproxyError):
    """An upstream failure: `problem` is what the client gets; `sent` if it may have acted;
    `answered` if it did answer, with a response the proxy cannot relay (the request was
    executed: the failure is the outcome, not "maybe not executed")."""

    def __init__(self, problem: ProblemError, *, sent: bool, answered: bool = False) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.sent = sent
        self.answered = answered


# The retry hints clients read besides the status: Stainless-generated SDKs (OpenAI,
# Anthropic, Increase, Orb, Modern Treasury, ...) `x-should-retry`, Stripe's own
# `Stripe-Should-Retry`. Either overrides the SDK's own choice by status: without them,
# some retry a 409 only a couple of times, or not at all, and report a request that in
# fact ran as failed (issue #25). `framing.problem_response` sets them from `retry`.
RETRY_HINTS = ("x-should-retry", "Stripe-Should-Retry")


def retry_headers(retry: bool | None) -> dict[str, str]:
    """The headers a problem with this `retry` carries: the hints, and Retry-After (1 s)
    when the same request later will work."""
    if retry is None:
        return {}
    flag = "true" if retry else "false"
    hints = dict.fromkeys(RETRY_HINTS, flag)
    return {"Retry-After": "1", **hints} if retry else hints


def store_unavailable() -> ServiceUnavailable:
    """The answer whenever the store failed a guarded or admin request before anything was
    done (fail closed, design §2 and §9): 503 + Retry-After."""
    return ServiceUnavailable("The idempotency store is unreachable or failed; nothing "
                              "was done (a guarded request was not forwarded). Retry "
                              "later.",
                              headers={"Retry-After": "1"})


def describe(exc: BaseException) -> str:
    """An exception as log and error text that is never empty: `TimeoutError()` has no
    message, so its class name stands in (`error: TimeoutError: ` said nothing)."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def for_http_status(status: int, *, reason: str, detail: str,
                    headers: dict[str, str] | None = None) -> ProblemError:
    """The problem for a status aiohttp raised itself (the admin app's 404, 405, ...)."""
    known: dict[int, type[ProblemError]] = {404: NotFound, 405: MethodNotAllowed}
    if status in known:
        return known[status](detail, headers=headers)
    return HTTPProblem(status, reason, detail, headers=headers)
