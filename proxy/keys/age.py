"""Pure: refuse a retry that is older than its route's window (OASIS repeatability).

Once a key's window (`ttl`) has ended its record is gone, and a retry would run as new.
Two things in a request say how old it is, without any stored state:

    Repeatability-First-Sent: Sun, 06 Dec 2026 10:00:00 GMT   when the client first sent
                              it (OASIS repeatability; an RFC 7231 HTTP-date)
    a UUIDv7 key              its first 48 bits are its creation time in ms (RFC 9562)

A request first sent longer ago than `ttl`, or whose UUIDv7 key is older than
`max_key_age`, is refused (RetryTooOld, `stale_status`, 412 by default) and never runs.
The clock is the database's (the flow passes it in), as for every window.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping

from proxy.config import Route
from proxy.config.values import format_duration
from proxy.errors import BadRequest, RetryTooOld
from proxy.keys.sources import header_values

__all__ = ["FIRST_SENT", "check_age", "first_sent", "uuid7_time"]

FIRST_SENT = "Repeatability-First-Sent"
_HEX = frozenset("0123456789abcdefABCDEF")


def check_age(route: Route, *, key: str, headers: Mapping[str, str], now: float) -> None:
    """Raise RetryTooOld when the request is older than the route allows; BadRequest
    when its Repeatability-First-Sent is not one HTTP-date."""
    sent = first_sent(headers)
    if sent is not None and now - sent > route.ttl:
        raise RetryTooOld(
            f"The request was first sent {format_duration(int(now - sent))} ago "
            f"({FIRST_SENT}), longer than route {route.name!r} keeps a key "
            f"({format_duration(route.ttl)}): it was not run, since its first attempt may "
            "have run and been forgotten. Send it as a new request with a new key if it "
            "is meant to run.", status=route.stale_status)
    if route.max_key_age is None:
        return
    born = uuid7_time(key)
    if born is not None and now - born > route.max_key_age:
        raise RetryTooOld(
            f"The idempotency key is a UUIDv7 created {format_duration(int(now - born))} ago, "
            f"longer than route {route.name!r} accepts (max_key_age "
            f"{format_duration(route.max_key_age)}): it was not run. Send it as a new "
            "request with a new key if it is meant to run.", status=route.stale_status)


def first_sent(headers: Mapping[str, str]) -> float | None:
    """Repeatability-First-Sent as seconds since the epoch, None when absent."""
    lines = header_values(headers, FIRST_SENT)
    if not lines:
        return None
    if len(lines) > 1:
        raise BadRequest(f"The request carries {len(lines)} {FIRST_SENT} headers; send one.")
    value = lines[0].strip(" \t")
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        when = None
    if when is None or when.tzinfo is None or len(value) > 64:
        raise BadRequest(f"The {FIRST_SENT} header is not an HTTP-date (RFC 7231 "
                         "IMF-fixdate, like 'Sun, 06 Nov 1994 08:49:37 GMT').")
    return when.timestamp()


def uuid7_time(key: str) -> float | None:
    """The creation time (seconds) of a UUIDv7 key in its canonical 8-4-4-4-12 form;
    None for any other key."""
    if len(key) != 36 or key[8] != "-" or key[13] != "-" or key[18] != "-" or \
            key[23] != "-":
        return None
    digits = key.replace("-", "")
    if len(digits) != 32 or not _HEX.issuperset(digits):
        return None
    if digits[12] != "7" or digits[16] not in "89abAB":  # version 7, RFC 9562 variant
        return None
    return int(digits[:12], 16) / 1000.0
