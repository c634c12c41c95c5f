"""The policy of a guarded request, as pure functions: plain data in, a decision out.

Design §2's table, the rows that depend on the key's state, the route's policies and the
upstream's outcome. The I/O layer (idempotency.py, execute.py) asks here and carries the
decision out; nothing in this module awaits, reads a socket or touches the store, and
tests/test_decide.py checks every row without either.

    claim ─ on_claim ─┬─ FORWARD ──── upstream ─┬─ answered ─ on_answer ─┬─ RECORD
                      ├─ FAIL_DEAD_CLAIM        │                        └─ RELEASE
                      ├─ REPLAY                 └─ failed ─ on_upstream_failure ─┬─ RELEASE
                      ├─ MISMATCH                                                ├─ KEEP
                      ├─ CONFLICT                                                └─ STORE_FAILURE
                      └─ WAIT (then claim again)
    store failed before forwarding ─ on_store_down ─┬─ REFUSE (503)
                                                     └─ PASS_THROUGH (unguarded)
"""

from __future__ import annotations

import enum
import functools
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import NamedTuple

from proxy.config import Concurrent, Route, StoreUnavailablePolicy, UnknownOutcome
from proxy.errors import Draining, KeyInFlight, KeyReused, ProblemError
from proxy.observe import Outcome
from proxy.store import ClaimOutcome, State


class OnClaim(enum.Enum):
    """What a claim's result means for this request."""

    FORWARD = "forward"  # this request owns the key: send it upstream once
    FAIL_DEAD_CLAIM = "fail_dead_claim"  # took over a dead claim; unknown_outcome: fail
    REPLAY = "replay"  # completed, same request: the stored answer
    MISMATCH = "mismatch"  # same key, another request: 422 (mismatch_status)
    CONFLICT = "conflict"  # still in flight: 409 + Retry-After
    WAIT = "wait"  # still in flight, concurrent: wait: hold and claim again


def on_claim(outcome: ClaimOutcome, *, state: State, same_fingerprint: bool,
             concurrent: Concurrent, unknown_outcome: UnknownOutcome,
             may_wait: bool = True) -> OnClaim:
    """`may_wait`: False once a waiting retry's wait_timeout has run out (then 409)."""
    if outcome is ClaimOutcome.NEW:
        return OnClaim.FORWARD
    if outcome is ClaimOutcome.TAKEN_OVER:
        # The dead claim's request may have reached the upstream: with `fail`, that
        # unknown outcome is the answer for the rest of the window, never a second try.
        if unknown_outcome is UnknownOutcome.FAIL:
            return OnClaim.FAIL_DEAD_CLAIM
        return OnClaim.FORWARD
    if not same_fingerprint:
        return OnClaim.MISMATCH
    if state is State.COMPLETED:
        return OnClaim.REPLAY
    if concurrent is Concurrent.WAIT and may_wait:
        return OnClaim.WAIT
    return OnClaim.CONFLICT


class OnAnswer(enum.Enum):
    """What an upstream answer (a status line arrived) means for the key."""

    RECORD = "record"  # stream it back while recording; complete the key with it
    RELEASE = "release"  # pass it on unstored and release the key (release_statuses)


_CLASSES = {n: f"{n}xx" for n in range(1, 6)}


def on_answer(status: int, *, release_statuses: frozenset[int | str] | frozenset[int],
              store_statuses: frozenset[int | str] | None = None) -> OnAnswer:
    """Released when release_statuses names the status more specifically than
    store_statuses does (an integer beats its class: `store_statuses: [2xx, 4xx]` with
    the default release_statuses stores a 404, releases a 429); with no store_statuses,
    every status not released is stored; with one, a status neither names is released.
    A status or class in both lists is refused by the config (routes._check_statuses)."""
    released = _named(status, release_statuses)
    if store_statuses is None:
        return OnAnswer.RELEASE if released else OnAnswer.RECORD
    return OnAnswer.RECORD if _named(status, store_statuses) > released else OnAnswer.RELEASE


def _named(status: int, statuses: frozenset[int | str] | frozenset[int]) -> int:
    """2: the status itself is listed; 1: its class is; 0: neither."""
    if status in statuses:
        return 2
    return 1 if _CLASSES.get(status // 100) in statuses else 0


class OnFailure(enum.Enum):
    """What a failed upstream exchange (no whole answer) means for the key."""

    RELEASE = "release"  # never sent: no effect happened, a retry forwards again
    KEEP = "keep"  # may have acted: the claim stays until its lease ends
    STORE_FAILURE = "store_failure"  # may have acted, unknown_outcome: fail: store the error
    RESEND = "resend"  # may have acted, unknown_outcome: resend: same upstream key, again


def on_upstream_failure(*, sent: bool, unknown_outcome: UnknownOutcome,
                        answered: bool = False, resends_left: int = 0) -> OnFailure:
    """`answered`: the upstream did answer, with a response the proxy cannot relay: it
    acted, and that failure is the one verdict for the key (design §9), stored.
    `resends_left`: with `unknown_outcome: resend`, the attempts still allowed; once
    spent, the claim is kept as under `retry` (a retry after the lease re-sends the same
    upstream key too)."""
    if not sent:
        return OnFailure.RELEASE
    if answered or unknown_outcome is UnknownOutcome.FAIL:
        return OnFailure.STORE_FAILURE
    if unknown_outcome is UnknownOutcome.RESEND and resends_left > 0:
        return OnFailure.RESEND
    return OnFailure.KEEP


class OnStoreDown(enum.Enum):
    """A guarded request whose claim failed in the store (nothing was forwarded)."""

    REFUSE = "refuse"  # 503 + Retry-After: fail closed (the default)
    PASS_THROUGH = "pass_through"  # store_unavailable: pass_through: forward unguarded


def on_store_down(policy: StoreUnavailablePolicy) -> OnStoreDown:
    if policy is StoreUnavailablePolicy.PASS_THROUGH:
        return OnStoreDown.PASS_THROUGH
    return OnStoreDown.REFUSE


def body_fits(size: int, *, limit: int) -> bool:
    """A request body of `size` bytes is accepted (over max_request_body: 413)."""
    return size <= limit


# --- the whole answer of a request that ends without the upstream ---------------------

def http_date(when: datetime) -> str:
    """RFC 9110 HTTP-date (whole seconds)."""
    return _http_date(int(when.timestamp()))


@functools.lru_cache(maxsize=4096)
def _http_date(epoch: int) -> str:
    # Cached by the second: keys claimed in the same second share their expiry's text,
    # and every replay of a key formats the same instant.
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


def guard_headers(route: Route, expires_at: datetime) -> dict[str, str]:
    """Headers every guarded response carries: when the key's window ends."""
    return {route.expires_header: http_date(expires_at)} if route.expires_header else {}


class Refusal(NamedTuple):
    """How a guarded request ends when the decision alone answers it: what it is counted
    as, the problem raised (its type, status and detail) and every header it carries
    (the key's expiry, Retry-After; framing adds the retry hints the type implies)."""

    outcome: Outcome
    problem: type[ProblemError]
    status: int
    detail: str
    headers: dict[str, str]

    def error(self) -> ProblemError:
        """The problem to raise: the proxied port's refusal handler answers it."""
        exc = self.problem(self.detail, headers=dict(self.headers))
        exc.status = self.status
        return exc


def refusal(verdict: OnClaim, *, route: Route, expires_at: datetime,
            waited: bool = False) -> Refusal:
    """The answer to MISMATCH or CONFLICT (`waited`: a retry held by `concurrent: wait`
    whose wait_timeout ran out)."""
    expiry = guard_headers(route, expires_at)
    if verdict is OnClaim.MISMATCH:
        return Refusal(Outcome.MISMATCH, KeyReused, route.mismatch_status,
                       "This idempotency key was already used for a different request "
                       "(method, path, query or body differ). Use a new key.", expiry)
    if verdict is not OnClaim.CONFLICT:
        raise ValueError(f"{verdict} is not answered by a refusal")
    detail = (f"The first request with this key did not complete within "
              f"{route.wait_timeout:g}s." if waited else
              "A request with this idempotency key is still being processed. "
              "Retry after it completes.")
    return Refusal(Outcome.CONFLICT, KeyInFlight, 409, detail,
                   {"Retry-After": "1", **expiry})


DRAINING = Refusal(Outcome.DRAINING, Draining, 503,
                   "This proxy is draining and takes no new requests with a key; nothing "
                   "was done. Retry (another replica will serve it).", {"Retry-After": "1"})
