"""Pacing an eviction while the event loop serves requests.

An eviction batch is SQLite's own work on a background thread (~2 ms of CPU per evicted
manifest), and the files go on threads of their own. On a host with few cores, a long eviction
run beside a busy event loop takes CPU the loop then waits for: at full scale on 2 cores, warm
lookups' p99 went from ~0.8 ms idle to 3.5-5.2 ms while 30% of the store was evicted, the loop's
thread runnable-but-not-running 0.07-0.15 s per second (benchmarks/README.md, issue 11).

So between two batches an eviction that is not short of disk space (the store is above
``storage.max_size``, not the filesystem under ``min_free``, and no transfer is waiting for
room) looks at how busy the event loop's thread was since the last batch began (its own CPU
time, ``time.thread_time``, which counts only this thread): above :data:`BUSY_SHARE` of a core
it rests :data:`REST_RATIO` times as long as that step of the round took (the batch's index
work, forgetting its lookups, waiting for the files of the batch before) before the next one,
so the batches take about half the time while requests keep the loop busy, and run back to
back when it is idle. Disk-space evictions never rest: a full disk is worse than slower lookups.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Final

#: the loop's share of a core (its thread's CPU over wall time) above which eviction rests
BUSY_SHARE: Final = 0.5
#: how long it rests, as a multiple of the batch it just ran
REST_RATIO: Final = 1.0
#: never longer than this at once (a batch that waited long for the index)
MAX_REST: Final = 0.25


class Pace:
    """Decides, after each batch, how long an eviction rests (see the module's docstring).
    Must be used on the event loop's thread (its CPU time is what :func:`time.thread_time`
    reads there)."""

    def __init__(
        self,
        *,
        wall: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.wall, self.cpu, self._sleep = wall, cpu, sleep
        self.rested = 0.0  # seconds rested in all
        self._mark = (wall(), cpu())

    def begin(self) -> None:
        """A batch begins: the loop's busy share is measured from here."""
        self._mark = (self.wall(), self.cpu())

    def rest_for(self) -> float:
        """Seconds to rest after a batch (one step of the round: its index work, forgetting
        its lookups, waiting for the batch before's files) begun at :meth:`begin`."""
        wall0, cpu0 = self._mark
        elapsed = self.wall() - wall0
        if elapsed <= 0:
            return 0.0
        busy = (self.cpu() - cpu0) / elapsed
        if busy < BUSY_SHARE:
            return 0.0
        return min(MAX_REST, REST_RATIO * elapsed)

    async def rest(self) -> None:
        seconds = self.rest_for()
        if seconds > 0:
            self.rested += seconds
            await self._sleep(seconds)
