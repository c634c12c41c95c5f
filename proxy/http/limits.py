"""The cap on request-body memory held at once (`client.max_body_memory`).

Guarded requests read their whole body before the upstream is called (the fingerprint
covers it), so N slow uploads of `max_request_body` each could hold N times that. Each
request's reading takes its bytes from one per-process budget before buffering them; a
body that does not fit is refused with 503 and `Retry-After`, never buffered, and the
request's bytes go back to the budget when its handler ends.
"""

from __future__ import annotations

from aiohttp import web

from proxy.errors import ProxyBusy


class BodyBudget:
    """Bytes of request bodies held at once, across the requests of one process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def ticket(self, request: web.BaseRequest) -> Ticket:
        """The request's share; `reserve(request, n)` draws on it until `release`."""
        t = Ticket(self)
        request[_TICKET] = t
        return t


class Ticket:
    __slots__ = ("budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def take(self, size: int) -> None:
        """Hold `size` more bytes, or raise ProxyBusy (503) if the budget is spent."""
        b = self.budget
        if b.used + size > b.limit:
            raise ProxyBusy("The proxy holds as many request bodies as it may "
                            "(client.max_body_memory); retry shortly.",
                            headers={"Retry-After": "1"}, close=True)
        b.used += size
        self.held += size

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


_TICKET = web.RequestKey("body_ticket", Ticket)


def fits(request: web.BaseRequest, size: int) -> bool:
    """Whether `reserve(request, size)` would succeed now (True outside the handler)."""
    ticket = request.get(_TICKET)
    return ticket is None or ticket.budget.used + size <= ticket.budget.limit


def reserve(request: web.BaseRequest, size: int) -> None:
    """Take `size` bytes for this request's body (no-op outside the proxied handler)."""
    ticket = request.get(_TICKET)
    if ticket is not None and size > 0:
        ticket.take(size)
