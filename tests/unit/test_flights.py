"""Single flights run once per key and survive the first caller going away."""

from __future__ import annotations

import asyncio

import pytest

from regproxy.flights import SingleFlights


async def test_one_run_per_key_and_a_cancelled_caller_cancels_nobody_else() -> None:
    flights = SingleFlights("test")
    gate = asyncio.Event()
    runs = 0

    async def work() -> str:
        nonlocal runs
        runs += 1
        await gate.wait()
        return "answer"

    first = asyncio.create_task(flights.run("k", work))
    await asyncio.sleep(0)
    others = [asyncio.create_task(flights.run("k", work)) for _ in range(3)]
    await asyncio.sleep(0)
    first.cancel()
    gate.set()
    assert await asyncio.gather(*others) == ["answer"] * 3
    with pytest.raises(asyncio.CancelledError):
        await first
    assert runs == 1
    assert len(flights) == 0  # done: the next call runs afresh
    assert await flights.run("k", work) == "answer" and runs == 2


async def test_a_failure_reaches_every_caller_once_and_is_not_kept() -> None:
    flights = SingleFlights("test")

    async def boom() -> None:
        raise ValueError("upstream said no")

    results = await asyncio.gather(
        *(flights.run("k", boom) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, ValueError) for r in results)
    assert len(flights) == 0
