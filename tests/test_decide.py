"""The pure decision core (proxy/flow/decide.py and the pure functions it sits with): every
row of design §2's table, as plain data in and a decision out. No sockets, no Postgres."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from multidict import CIMultiDict

from proxy import keys
from proxy.config import Concurrent, Route, StoreUnavailablePolicy, UnknownOutcome
from proxy.errors import KeyMalformed, KeyMissing
from proxy.flow import decide
from proxy.flow.decide import OnAnswer, OnClaim, OnFailure, OnStoreDown
from proxy.flow.relay import pump
from proxy.http import routing
from proxy.paths import PathPattern
from proxy.store import ClaimOutcome, State

NEW, TAKEN_OVER, EXISTING = ClaimOutcome.NEW, ClaimOutcome.TAKEN_OVER, ClaimOutcome.EXISTING
IN_FLIGHT, COMPLETED = State.IN_FLIGHT, State.COMPLETED
REJECT, WAIT = Concurrent.REJECT, Concurrent.WAIT
RETRY, FAIL, RESEND = UnknownOutcome.RETRY, UnknownOutcome.FAIL, UnknownOutcome.RESEND
DEFAULT_RELEASE = Route(name="r", methods=frozenset({"POST"}),
                        path=PathPattern.compile("/r")).release_statuses

# (design §2 row, claim outcome, record state, same fingerprint, concurrent,
#  unknown_outcome, may wait, decision)
CLAIM_ROWS = [
    ("first request for a key", NEW, IN_FLIGHT, True, REJECT, RETRY, True, OnClaim.FORWARD),
    ("first request, unknown_outcome: fail", NEW, IN_FLIGHT, True, WAIT, FAIL, True,
     OnClaim.FORWARD),
    ("the key's window has passed: a new key", NEW, IN_FLIGHT, True, WAIT, RETRY, True,
     OnClaim.FORWARD),
    ("retry after completion, same fingerprint", EXISTING, COMPLETED, True, REJECT, RETRY,
     True, OnClaim.REPLAY),
    ("retry after completion, concurrent: wait", EXISTING, COMPLETED, True, WAIT, FAIL, True,
     OnClaim.REPLAY),
    ("same key, different fingerprint, completed", EXISTING, COMPLETED, False, REJECT,
     RETRY, True, OnClaim.MISMATCH),
    ("same key, different fingerprint, in flight", EXISTING, IN_FLIGHT, False, WAIT, RETRY,
     True, OnClaim.MISMATCH),
    ("in flight, concurrent: reject", EXISTING, IN_FLIGHT, True, REJECT, RETRY, True,
     OnClaim.CONFLICT),
    ("in flight, concurrent: wait", EXISTING, IN_FLIGHT, True, WAIT, RETRY, True,
     OnClaim.WAIT),
    ("in flight, concurrent: wait, wait_timeout passed", EXISTING, IN_FLIGHT, True, WAIT,
     RETRY, False, OnClaim.CONFLICT),
    ("a claim's proxy died, lease over, unknown_outcome: retry", TAKEN_OVER, IN_FLIGHT, True,
     REJECT, RETRY, True, OnClaim.FORWARD),
    ("a claim's proxy died, lease over, unknown_outcome: fail", TAKEN_OVER, IN_FLIGHT, True,
     REJECT, FAIL, True, OnClaim.FAIL_DEAD_CLAIM),
    ("a claim's proxy died, lease over, unknown_outcome: resend (same upstream key)",
     TAKEN_OVER, IN_FLIGHT, True, REJECT, RESEND, True, OnClaim.FORWARD),
]


@pytest.mark.parametrize(("row", "outcome", "state", "same", "concurrent", "unknown",
                          "may_wait", "expected"), CLAIM_ROWS, ids=[r[0] for r in CLAIM_ROWS])
def test_claim_results(row, outcome, state, same, concurrent, unknown, may_wait, expected):
    """What a claim's result means: forward, replay, 422, 409, wait, or store the failure."""
    assert decide.on_claim(outcome, state=state, same_fingerprint=same,
                           concurrent=concurrent, unknown_outcome=unknown,
                           may_wait=may_wait) is expected


# (design §2 row, sent, answered, unknown_outcome, re-sends left, decision)
FAILURE_ROWS = [
    ("upstream refused the connection (never sent)", False, False, RETRY, 0, OnFailure.RELEASE),
    ("upstream refused, unknown_outcome: fail: still released", False, False, FAIL,
     0, OnFailure.RELEASE),
    ("timed out or reset after sending, unknown_outcome: retry", True, False, RETRY,
     0, OnFailure.KEEP),
    ("timed out or reset after sending, unknown_outcome: fail", True, False, FAIL,
     0, OnFailure.STORE_FAILURE),
    ("answered, but not relayable (one verdict per answer, §9)", True, True, RETRY,
     0, OnFailure.STORE_FAILURE),
    ("timed out or reset after sending, unknown_outcome: resend", True, False, RESEND, 3,
     OnFailure.RESEND),
    ("unknown_outcome: resend, every re-send spent: kept as under retry", True, False,
     RESEND, 0, OnFailure.KEEP),
    ("unknown_outcome: resend, never sent: released", False, False, RESEND, 3,
     OnFailure.RELEASE),
    ("unknown_outcome: resend, answered but not relayable: stored", True, True, RESEND, 3,
     OnFailure.STORE_FAILURE),
]


@pytest.mark.parametrize(("row", "sent", "answered", "unknown", "left", "expected"),
                         FAILURE_ROWS, ids=[r[0] for r in FAILURE_ROWS])
def test_upstream_failures(row, sent, answered, unknown, left, expected):
    """A failed exchange releases the key (not sent), keeps the claim, stores the error,
    or (unknown_outcome: resend, attempts left) is re-sent with the same upstream key."""
    assert decide.on_upstream_failure(sent=sent, answered=answered, unknown_outcome=unknown,
                                      resends_left=left) is expected


@pytest.mark.parametrize("status", [408, 425, 429, 502, 503, 504])
def test_release_statuses_are_passed_on_and_released(status):
    """An answer in release_statuses (the defaults) is passed on but not stored."""
    assert decide.on_answer(status, release_statuses=DEFAULT_RELEASE) is OnAnswer.RELEASE


@pytest.mark.parametrize("status", [200, 201, 204, 302, 400, 404, 409, 422, 500])
def test_other_statuses_are_recorded(status):
    """Any other answer (2xx, 3xx, 4xx, 500, ...) is stored and replayed."""
    assert decide.on_answer(status, release_statuses=DEFAULT_RELEASE) is OnAnswer.RECORD
    assert decide.on_answer(503, release_statuses=frozenset()) is OnAnswer.RECORD


def test_store_unreachable_fails_closed_unless_the_route_opts_out():
    """Postgres unreachable: 503 by default; store_unavailable: pass_through forwards."""
    assert decide.on_store_down(StoreUnavailablePolicy.REJECT) is OnStoreDown.REFUSE
    assert decide.on_store_down(StoreUnavailablePolicy.PASS_THROUGH) is \
        OnStoreDown.PASS_THROUGH


def test_body_over_max_request_body_is_refused():
    """A request body over max_request_body is refused (413); up to it, accepted."""
    assert decide.body_fits(10, limit=10) and not decide.body_fits(11, limit=10)


ROUTE = Route(name="r", methods=frozenset({"POST"}), path=PathPattern.compile("/r"))


def test_no_route_or_method_not_in_route_streams_through():
    """No route matches, or the method is not the route's: not guarded (pass-through)."""
    assert routing.resolve([ROUTE], "POST", "/other") is None
    assert routing.resolve([ROUTE], "PUT", "/r") is None
    assert routing.resolve([ROUTE], "POST", "/r") is not None


def _key(route: Route, headers: dict[str, str]) -> str | None:
    return keys.read_key(route, headers=CIMultiDict(headers), params={}, body=None, now=0,
                         keyed=lambda m: m.hex())


def test_no_key_is_unguarded_or_400_by_require_key():
    """No key: unguarded when require_key is false, KeyMissing (400) when it is true."""
    from dataclasses import replace
    assert _key(ROUTE, {}) is None
    with pytest.raises(KeyMissing):
        _key(replace(ROUTE, require_key=True), {})


@pytest.mark.parametrize("raw", ["", "a" * 256, "caf\u00e9"])
def test_malformed_key_is_400(raw):
    """A key that is empty, over 255 characters or not printable ASCII is a 400."""
    with pytest.raises(KeyMalformed):
        _key(ROUTE, {"Idempotency-Key": raw})


class _GoneSink:
    """A client that hung up before the upstream answered."""

    gone = True
    behind = False

    async def write(self, chunk: bytes) -> None:
        return None

    async def write_lagging(self, chunk: bytes) -> None:
        return None


def test_client_gone_the_answer_is_still_recorded():
    """The client disconnects before the answer: the pump still records all of it."""
    recorded: list[bytes] = []

    async def record(chunk: bytes) -> None:
        recorded.append(chunk)

    async def chunks():
        for c in (b"a", b"b", b"c"):
            yield c

    held = asyncio.run(pump(chunks(), _GoneSink(), record=record))
    assert recorded == [b"a", b"b", b"c"] and held == b"c"


# --- the whole answer of a request the decision alone answers --------------------------

WHEN = datetime(2026, 12, 7, 1, 2, 3, tzinfo=UTC)
EXPIRES = {"Idempotency-Expires": "Mon, 07 Dec 2026 01:02:03 GMT"}
PLAIN = Route(name="r", methods=frozenset({"POST"}), path=PathPattern.compile("/r"))
QUIET = Route(name="q", methods=frozenset({"POST"}), path=PathPattern.compile("/q"),
              expires_header=None, mismatch_status=409, wait_timeout=2.5)

# (design §2 row, verdict, route, waited, outcome, status, problem slug, headers)
REFUSAL_ROWS = [
    ("same key, different request", OnClaim.MISMATCH, PLAIN, False, "mismatch", 422,
     "key-reused", EXPIRES),
    ("same key, different request, mismatch_status: 409, no expiry header",
     OnClaim.MISMATCH, QUIET, False, "mismatch", 409, "key-reused", {}),
    ("in flight, concurrent: reject", OnClaim.CONFLICT, PLAIN, False, "conflict", 409,
     "key-in-flight", {"Retry-After": "1", **EXPIRES}),
    ("in flight, concurrent: wait, wait_timeout passed", OnClaim.CONFLICT, QUIET, True,
     "conflict", 409, "key-in-flight", {"Retry-After": "1"}),
]


@pytest.mark.parametrize(("row", "verdict", "route", "waited", "outcome", "status", "slug",
                          "headers"), REFUSAL_ROWS, ids=[r[0] for r in REFUSAL_ROWS])
def test_refusals_are_whole_answers(row, verdict, route, waited, outcome, status, slug,
                                    headers):
    """A refusal decided from the claim alone comes with its outcome, status, problem and
    every header (the key's expiry, Retry-After), computed without I/O."""
    answer = decide.refusal(verdict, route=route, expires_at=WHEN, waited=waited)
    assert (answer.outcome.value, answer.status, answer.headers) == (outcome, status, headers)
    exc = answer.error()
    assert (exc.status, exc.slug, exc.headers) == (status, slug, headers)
    if waited:
        assert "within 2.5s" in exc.detail


def test_draining_is_a_whole_answer():
    """A draining proxy's refusal of a new claim: 503, Retry-After, counted as draining."""
    answer = decide.DRAINING
    assert (answer.outcome.value, answer.status, answer.headers) == (
        "draining", 503, {"Retry-After": "1"})
    assert answer.error().slug == "draining"


def test_only_refusals_are_answered_by_refusal():
    """Verdicts that forward, replay or wait have no refusal answer."""
    for verdict in (OnClaim.FORWARD, OnClaim.REPLAY, OnClaim.WAIT):
        with pytest.raises(ValueError):
            decide.refusal(verdict, route=PLAIN, expires_at=WHEN)
