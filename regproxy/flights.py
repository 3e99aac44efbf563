"""Single flights: identical work asked for at once runs once, in a task of its own.

Every caller awaits the same task through :func:`asyncio.shield`, so a caller that goes away
(a client hanging up cancels its request) leaves the others their answer, and the work is not
cut half-way. The work must bound itself (upstream requests carry their own deadlines).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlights:
    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        """``make()``'s result, shared by every caller with the same key while it runs."""
        task = self._tasks.get(key)
        if task is None:

            async def work() -> T:
                return await make()

            task = asyncio.get_running_loop().create_task(work(), name=f"{self.name} {key}")
            self._tasks[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        result: T = await asyncio.shield(task)
        return result

    def _done(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waited

    def cancel_all(self) -> None:
        """Shutdown: nothing is waited for any more."""
        for task in list(self._tasks.values()):
            task.cancel()
