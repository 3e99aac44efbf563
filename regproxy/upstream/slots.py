"""How many requests one upstream gets: ``max_connections`` slots at once, at most
``max_requests_per_second`` started, and a fair queue for the rest.

A slot is held for a whole logical request: its auth, its redirects and, for a blob, until the
body is closed. Waiting for a slot is queued in arrival order and is not a connect timeout (the
connect timeout is the TCP/TLS connect alone): 200 cold pulls from one upstream with 16 slots
all go through, 16 at a time. What bounds the wait is the waiter's own deadline (a blob
transfer's ``max_transfer_time``), because every slot holder is itself bounded. With a request
rate, each request that gets a slot is given the next free start time, in queue order.

The queue length and the wait are exported per upstream.
"""

from __future__ import annotations

import asyncio
from collections import deque

from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.metrics import SourceMeters


class Slot:
    """One held slot; :meth:`release` gives it to the next in the queue (idempotent)."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Slots) -> None:
        self._owner: Slots | None = owner

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._hand_on()


class Slots:
    """``limit`` slots handed out first come, first served; ``rate`` starts per second (0: any)."""

    def __init__(
        self,
        limit: int,
        label: str,
        *,
        rate: float = 0.0,
        timing: Timing = DEFAULT_TIMING,
        meters: SourceMeters,
    ) -> None:
        self.limit = limit
        self.label = label
        self.meters = meters
        self.rate = rate
        self._timing = timing
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: the clock time the next request may start at (with a rate)
        self._next_start = 0.0

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> Slot:
        started = self._timing.now()
        slot: Slot | None = None
        delay = 0.0
        if self._free > 0 and not self._waiters:
            self._free -= 1
            slot = Slot(self)
            delay = self._start_delay()
            if delay <= 0:
                return slot
        queue = self.meters.queue.labels(self.label) if self.meters.queue is not None else None
        if queue is not None:
            queue.inc()
        try:
            if slot is None:
                slot = await self._wait_turn()
                delay = self._start_delay()
            if delay > 0:
                await self._timing.sleep(delay)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        finally:
            if queue is not None:
                queue.dec()
            if self.meters.queue_seconds is not None:
                waited = self._timing.now() - started
                self.meters.queue_seconds.labels(self.label).observe(waited)
        return slot

    async def _wait_turn(self) -> Slot:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._hand_on()  # handed to us as we were cancelled: pass it on
            else:
                self._drop(fut)
            raise
        return Slot(self)

    def _start_delay(self) -> float:
        """With a rate: book the next start time, in queue order; seconds until it comes."""
        if self.rate <= 0:
            return 0.0
        now = self._timing.now()
        start = max(now, self._next_start)
        self._next_start = start + 1.0 / self.rate
        return start - now

    def _drop(self, fut: asyncio.Future[None]) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def _hand_on(self) -> None:
        """A slot came free: to the first live waiter, else back to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1
