"""How many requests one upstream gets at once: ``max_connections`` slots, a fair queue for more.

A slot is held for a whole logical request: its auth, its redirects and, for a blob, until the
body is closed. Waiting for a slot is queued in arrival order and is not a connect timeout (the
connect timeout is the TCP/TLS connect alone): 200 cold pulls from one upstream with 16 slots
all go through, 16 at a time. What bounds the wait is the waiter's own deadline (a blob
transfer's ``max_transfer_time``), because every slot holder is itself bounded.

The queue length and the wait are exported per upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from regproxy import metrics


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
    """``limit`` slots handed out first come, first served."""

    def __init__(self, limit: int, label: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.label = label
        self._clock = clock
        self._free = limit
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    async def acquire(self) -> Slot:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return Slot(self)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        started = self._clock()
        queue = metrics.UPSTREAM_QUEUE.labels(self.label)
        queue.inc()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._hand_on()  # handed to us as we were cancelled: pass it on
            else:
                self._drop(fut)
            raise
        finally:
            queue.dec()
            metrics.UPSTREAM_QUEUE_SECONDS.labels(self.label).observe(self._clock() - started)
        return Slot(self)

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
