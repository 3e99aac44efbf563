"""systemd ``Type=notify``: READY=1, STOPPING=1 and watchdog pings over ``$NOTIFY_SOCKET``.

The protocol is a few datagrams to a unix socket (sd_notify(3)): no library. The socket name is
a path, or an abstract name when it starts with ``@`` (the ``@`` becomes a NUL byte). With
``WatchdogSec=`` set, systemd passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be ours)
and expects ``WATCHDOG=1`` at least that often; we ping every half of it, from a task on the
event loop, so a wedged loop is exactly what the watchdog catches.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any, Final

log = logging.getLogger("regproxy.systemd")

#: pings below this interval would only burn CPU; systemd's own minimum is 1s of WatchdogSec
_MIN_PING_SECONDS: Final = 0.05


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # abstract namespace
    if name.startswith("/"):
        return name
    return None  # vsock and others are not for us


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog is asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid.isdigit() and int(pid) != os.getpid():
        return None  # meant for another process (e.g. the one that exec'd us)
    return max(int(usec) / 2_000_000, _MIN_PING_SECONDS)


class Notifier:
    """Sends sd_notify states; owns the watchdog task."""

    def __init__(self, socket_name: str | None, watchdog: float | None = None) -> None:
        self.socket_name = socket_name
        self.address = _address(socket_name) if socket_name else None
        if socket_name and self.address is None:
            log.warning("systemd.notify_socket_unsupported name=%s", socket_name)
        self.watchdog = watchdog if self.address is not None else None
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False when not under systemd or it failed."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(states).encode(), self.address)
        except OSError as exc:  # a full or gone socket must never stop the daemon
            log.warning("systemd.notify_failed states=%s error=%s", ",".join(states), exc)
            return False
        return True

    def ready(self, port: int) -> None:
        """The listener accepts: tell systemd, and start the watchdog pings if asked for."""
        if not self.enabled:
            return
        self.notify("READY=1", f"STATUS=listening on port {port}", f"MAINPID={os.getpid()}")
        log.info("systemd.ready socket=%s watchdog=%s", self.socket_name, self.watchdog)
        if self.watchdog is not None:
            self._spawn(self._ping(self.watchdog))

    def stop_on(self, stop: asyncio.Event) -> None:
        """Send STOPPING=1 as soon as ``stop`` is set (before the drain starts)."""
        if self.enabled:
            self._spawn(self._stopping(stop))

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def reloaded(self) -> None:
        self.notify("READY=1")

    async def _stopping(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self.notify("STOPPING=1", "STATUS=shutting down")

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.close_socket()


def notify_once(*states: str, env: Mapping[str, str] | None = None) -> bool:
    """Send states from any thread, on a socket of its own closed at once (work that runs
    before the daemon's notifier exists: an index upgrade at start-up); a no-op outside
    systemd."""
    notifier = Notifier.from_env(env)
    try:
        return notifier.notify(*states)
    finally:
        notifier.close_socket()
