"""Readiness checks answered within a budget (regproxy.health._Check), on a FakeTime."""

from __future__ import annotations

import asyncio

from regproxy.health import CHECK_TIMEOUT, _Check
from tests.inproc import FakeTime


class Disk:
    """A check whose next run waits on a gate (a slow fsync) or fails."""

    def __init__(self) -> None:
        self.runs = 0
        self.gate: asyncio.Event | None = None
        self.error: str | None = None

    async def run(self) -> str | None:
        self.runs += 1
        if self.gate is not None:
            await self.gate.wait()
        return self.error


async def test_a_slow_check_answers_with_the_one_before_and_runs_once() -> None:
    clock, disk = FakeTime(), Disk()
    check = _Check(disk.run, "timed out", clock.now)
    assert await check.result(1.0) is None and disk.runs == 1  # the first: waited for
    disk.gate, disk.error = asyncio.Event(), "disk failed"
    assert await check.result(0.0) is None  # still running: the last result
    assert await check.result(0.0) is None and disk.runs == 2  # not started again
    disk.gate.set()
    await asyncio.sleep(0)
    assert await check.result(0.0) == "disk failed"  # finished: its answer


async def test_a_failure_that_comes_at_once_is_answered_at_once() -> None:
    clock, disk = FakeTime(), Disk()
    check = _Check(disk.run, "timed out", clock.now)
    assert await check.result(1.0) is None
    disk.error = "read-only file system"
    assert await check.result(1.0) == "read-only file system"


async def test_a_check_that_hangs_is_a_failure_after_the_timeout() -> None:
    clock, disk = FakeTime(), Disk()
    check = _Check(disk.run, "timed out", clock.now)
    assert await check.result(1.0) is None
    disk.gate = asyncio.Event()
    assert await check.result(0.0) is None
    clock.advance(CHECK_TIMEOUT)
    assert await check.result(0.0) == "timed out" and disk.runs == 2
    disk.gate.set()
    await asyncio.sleep(0)
    disk.gate = None
    assert await check.result(1.0) is None  # the disk answers again: ready again
