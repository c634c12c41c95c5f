"""The error tree. Every error a client can cause or see is a `ProblemError`.

    IdemproxyError
    ├── ConfigError                 bad YAML config (never reaches a client)
    ├── StoreUnavailable            Postgres unreachable or timed out (-> 503 at the edge)
    └── ProblemError                rendered as RFC 9457 application/problem+json
        ├── BadRequest              400 malformed framing or headers
        ├── KeyMissing              400 route has require_key and no key was found
        ├── KeyMalformed            400 empty, too long, non-printable, several key headers
        ├── BodyTooLarge            413 request body over max_request_body
        ├── KeyInFlight             409 the first request with this key is still running
        ├── KeyReused               422 same key, different fingerprint (mismatch_status)
        ├── UpstreamUnreachable     502 connection refused: the request was never sent
        ├── UpstreamFailed          502 reset after sending: outcome unknown
        ├── UpstreamTimeout         504 no answer in time: outcome unknown
        ├── ServiceUnavailable      503 the store is down and the route fails closed
        └── StoredAnswerUnreadable  500 a sealed record cannot be opened (never re-executed)

Foreign exceptions (asyncpg, aiohttp client) are translated at exactly one boundary each:
`store/postgres.py` and `forward.py`.
"""

from __future__ import annotations

import json
from typing import ClassVar

ERROR_BASE = "https://idemproxy.dev/errors/"


class IdemproxyError(Exception):
    """Base of every error idemproxy raises on purpose."""


class ConfigError(IdemproxyError):
    """The configuration is invalid; `problems` lists every `field.path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class StoreUnavailable(IdemproxyError):
    """The database could not be reached or did not answer in time."""


class ProblemError(IdemproxyError):
    """An error answered to the client as application/problem+json."""

    status: int = 500  # per class; an instance may differ (KeyReused: mismatch_status)
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

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


class BodyTooLarge(ProblemError):
    status = 413
    slug = "body-too-large"
    title = "Request body too large"


class KeyInFlight(ProblemError):
    status = 409
    slug = "key-in-flight"
    title = "A request with this idempotency key is in progress"


class KeyReused(ProblemError):
    status = 422
    slug = "key-reused"
    title = "Idempotency key reused with a different request"

    def __init__(self, detail: str, *, status: int = 422,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail, headers=headers)
        self.status = status  # routes[].mismatch_status: 409 or 400 for some clients


class UpstreamUnreachable(ProblemError):
    status = 502
    slug = "upstream-unreachable"
    title = "Upstream unreachable"


class UpstreamFailed(ProblemError):
    status = 502
    slug = "upstream-failed"
    title = "Upstream failed after the request was sent"


class UpstreamTimeout(ProblemError):
    status = 504
    slug = "upstream-timeout"
    title = "Upstream timed out"


class ServiceUnavailable(ProblemError):
    status = 503
    slug = "store-unavailable"
    title = "Idempotency store unavailable"


class StoredAnswerUnreadable(ProblemError):
    """A stored record's key is not configured or its ciphertext was altered: an error,
    never a reason to execute the request again (proxy/sealing.py)."""

    status = 500
    slug = "stored-answer-unreadable"
    title = "Stored answer cannot be read"

    def __init__(self, detail: str, *, key_id: str) -> None:
        super().__init__(detail)
        self.key_id = key_id


def describe(exc: BaseException) -> str:
    """An exception as log and error text that is never empty: `TimeoutError()` has no
    message, so its class name stands in (`error: TimeoutError: ` said nothing)."""
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
