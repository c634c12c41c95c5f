"""The FIFO gate in front of the pool: slots go to waiters strictly in arrival order."""

from __future__ import annotations

import asyncio

import pytest

from proxy.store.gate import FifoGate


async def test_released_slot_goes_to_the_longest_waiter_not_a_newcomer():
    """A newcomer arriving after a release cannot take the slot from a waiter."""
    gate = FifoGate(1)
    await gate.acquire(timeout=1)
    order: list[str] = []

    async def take(name: str) -> None:
        await gate.acquire(timeout=1)
        order.append(name)
        gate.release()

    first = asyncio.create_task(take("waiter"))
    await asyncio.sleep(0)
    gate.release()
    newcomer = asyncio.create_task(take("newcomer"))  # arrives before the waiter runs
    await asyncio.gather(first, newcomer)
    assert order == ["waiter", "newcomer"]


async def test_timeout_leaves_the_line_and_keeps_slot_count():
    """A waiter that times out leaves the line; the gate's slots stay whole."""
    gate = FifoGate(1)
    await gate.acquire(timeout=1)
    with pytest.raises(asyncio.TimeoutError):
        await gate.acquire(timeout=0.05)
    gate.release()
    await gate.acquire(timeout=0.05)  # the one slot is free again
    gate.release()


async def test_many_waiters_are_served_in_arrival_order():
    """Under saturation every waiter is served, in the order it arrived."""
    gate = FifoGate(2)
    served: list[int] = []

    async def work(i: int) -> None:
        await gate.acquire(timeout=5)
        try:
            await asyncio.sleep(0.001)
            served.append(i)
        finally:
            gate.release()

    await asyncio.gather(*[work(i) for i in range(50)])
    assert served == sorted(served)
