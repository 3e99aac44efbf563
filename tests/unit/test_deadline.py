"""The transfer deadline (regproxy.deadline) on a clock the test moves."""

from __future__ import annotations

import itertools

import pytest

from regproxy.deadline import Pace, TransferLimits, backoff


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_steady_slow_transfer_passes_and_a_stall_fails() -> None:
    clock = Clock()
    pace = Pace(TransferLimits(min_rate=100, window=10, max_time=1000), clock, clock() + 1000)
    for _ in range(50):  # 150 B/s for 50 s: slow, but above 100 B/s
        clock.now += 1
        pace.add(150)
        assert pace.shortfall() is None
    # silence from now on: the window still holds 10 s of 150 B/s = 1500 B, 1000 are needed
    left = pace.time_left()
    assert 0 < left <= 10
    clock.now += left - 0.01
    assert pace.shortfall() is None
    clock.now += 0.02
    assert pace.shortfall() is not None and "min_rate" in pace.shortfall()  # type: ignore[operator]


def test_nothing_is_judged_before_a_whole_window_and_the_ceiling_holds() -> None:
    clock = Clock()
    pace = Pace(TransferLimits(min_rate=1024, window=60, max_time=30), clock, clock() + 30)
    assert pace.time_left() == pytest.approx(30)  # the ceiling comes before the window
    clock.now += 29
    assert pace.shortfall() is None
    clock.now += 1
    assert "max_transfer_time" in (pace.shortfall() or "")


def test_min_rate_zero_turns_the_rate_check_off() -> None:
    clock = Clock()
    pace = Pace(TransferLimits(min_rate=0, window=1, max_time=50), clock, clock() + 50)
    clock.now += 49
    assert pace.shortfall() is None
    assert pace.time_left() == pytest.approx(1)


def test_backoff_grows_is_never_zero_and_is_capped() -> None:
    lows = [backoff(n, lambda: 0.0) for n in range(1, 8)]
    highs = [backoff(n, lambda: 1.0) for n in range(1, 8)]
    assert lows[0] == pytest.approx(0.25) and highs[0] == pytest.approx(0.5)
    assert all(a < b for a, b in itertools.pairwise(lows[:5]))
    assert all(low > 0 for low in lows)
    assert max(highs) == pytest.approx(10.0)
