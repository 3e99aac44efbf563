"""Deadlines for transfers whose pace someone else controls (upstreams, peers).

A transfer must keep a minimum rate averaged over a window — a stall detector, not a speed
test: a slow link shared by many transfers still passes — and must end within a ceiling.
Retries of the same source back off exponentially with jitter, never back to back.

Time comes from a :class:`Timing` (clock, sleep, random) handed in, so tests move the clock
instead of sleeping past a deadline. Pure: no I/O, no internal imports.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

#: the window is kept in this many buckets: the rate is judged with that granularity
_BUCKETS: Final = 20


@dataclass(frozen=True, slots=True)
class Timing:
    """Where time comes from: the monotonic clock, the loop's sleep, a jitter source, and the
    wall clock (what is stored: when a tag was last confirmed upstream)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    random: Callable[[], float] = random.random
    wall: Callable[[], float] = time.time


DEFAULT_TIMING: Final = Timing()


@dataclass(frozen=True, slots=True)
class TransferLimits:
    """``min_rate`` bytes/s averaged over ``window`` seconds (0: none); at most ``max_time``."""

    min_rate: float = 1024.0
    window: float = 60.0
    max_time: float = 6 * 3600.0


DEFAULT_LIMITS: Final = TransferLimits()


def backoff(attempt: int, rand: Callable[[], float], base: float = 0.5, cap: float = 10.0) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first retry): exponential, half of it
    fixed and half jittered ("equal jitter"), so retries spread out and never come at once."""
    span = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return span / 2 + rand() * span / 2


@dataclass
class Pace:
    """Bytes over time of one transfer against its limits, on an injected clock.

    ``deadline`` is absolute on that clock (when the whole transfer must be over). Bytes are
    counted in buckets of ``window / 20``, each dated by its start, so the rate is judged a
    little early rather than late.
    """

    limits: TransferLimits
    clock: Callable[[], float]
    deadline: float
    started: float = field(default=0.0)
    _buckets: deque[list[float]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.started = self.clock()

    @property
    def _width(self) -> float:
        return max(self.limits.window / _BUCKETS, 1e-6)

    def add(self, nbytes: int) -> None:
        now = self.clock()
        start = math.floor(now / self._width) * self._width
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += nbytes
        else:
            self._buckets.append([start, float(nbytes)])
        while self._buckets and self._buckets[0][0] <= now - self.limits.window - self._width:
            self._buckets.popleft()

    def _in_window(self, now: float) -> float:
        return sum(n for t, n in self._buckets if t > now - self.limits.window)

    def shortfall(self) -> str | None:
        """Why the transfer must be dropped now, or None while it keeps its pace."""
        now = self.clock()
        if now >= self.deadline:
            return f"not done after {now - self.started:.0f}s (max_transfer_time)"
        need = self.limits.min_rate * self.limits.window
        if need > 0 and now - self.started >= self.limits.window:
            got = self._in_window(now)
            if got < need:
                return (
                    f"{got:.0f} bytes in the last {self.limits.window:g}s, "
                    f"below min_rate {self.limits.min_rate:g} B/s"
                )
        return None

    def time_left(self) -> float:
        """Seconds until :meth:`shortfall` would answer if no further byte arrived."""
        now = self.clock()
        until = self.deadline
        need = self.limits.min_rate * self.limits.window
        if need > 0:
            # the rate fails once the buckets still inside the window hold less than `need`:
            # walk from the newest bucket back to find the one whose expiry tips it
            kept = 0.0
            fails_at = self.started + self.limits.window
            for t, n in reversed(self._buckets):
                kept += n
                if kept >= need:
                    fails_at = max(fails_at, t + self.limits.window)
                    break
            until = min(until, fails_at)
        return max(0.0, until - now)
