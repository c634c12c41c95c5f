"""Start-up steps against the store (connection, migrations, installation secret) wait
for an unreachable database instead of exiting: a blip while a replica starts must not
leave it down (torture: proxies restarted during a pg_cut exited and stayed down)."""

from __future__ import annotations

import logging

import pytest

from proxy.errors import StoreUnavailable
from proxy.store.open import retry_unavailable


async def test_a_step_that_meets_an_unreachable_database_is_retried_until_it_succeeds(caplog):
    """Two StoreUnavailable, then the step's value: one warning per wait, naming where and
    what for, never the step's error."""
    calls: list[int] = []

    async def migrate() -> list[str]:
        calls.append(1)
        if len(calls) < 3:
            raise StoreUnavailable("ConnectionDoesNotExistError: connection was closed")
        return ["0010"]

    with caplog.at_level(logging.WARNING, logger="idemproxy"):
        got = await retry_unavailable(migrate, wait=30, where="db:5432/x", what="the migrations")
    assert got == ["0010"] and len(calls) == 3
    waits = [r.getMessage() for r in caplog.records if "waiting for the database" in r.getMessage()]
    assert len(waits) == 2 and all("db:5432/x" in w and "the migrations" in w for w in waits)
    assert "attempt 1" in waits[0] and "attempt 2" in waits[1]


async def test_a_database_unreachable_past_the_wait_is_an_error_naming_where():
    """Past `wait` the step's StoreUnavailable is raised, with where it was waiting for."""
    async def secret() -> None:
        raise StoreUnavailable("TimeoutError")

    with pytest.raises(StoreUnavailable, match="at db:5432/x: TimeoutError"):
        await retry_unavailable(secret, wait=0, where="db:5432/x")


async def test_other_errors_are_not_retried():
    """Only an unreachable database is waited for: any other error ends start-up at once."""
    calls: list[int] = []

    async def broken() -> None:
        calls.append(1)
        raise ValueError("not a store outage")

    with pytest.raises(ValueError):
        await retry_unavailable(broken, wait=30, where="db:5432/x")
    assert calls == [1]
