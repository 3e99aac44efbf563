"""The fast lane as the connection guard (regproxy.connections) sees it: what a lane answers
(:class:`FastLane`, regproxy.fastpath), a body it streams (:class:`LaneBody`,
regproxy.fastfile), and how the guard frames a connection's requests for it: whether bytes may
be the start of a strict request head, and whether a request head leaves the connection at the
next request once answered (no body, nothing about the connection)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Final, Protocol

#: a request head the fast lane waits for may be this long; a longer one goes to aiohttp
FAST_HEAD_MAX: Final = 8192
_FAST_STARTS: Final = (b"GET ", b"HEAD ")


class Outlet(Protocol):
    """The connection a body is written to (the guard's protocol for it)."""

    transport: asyncio.Transport | None
    #: the transport asked to stop writing (``pause_writing``) and has not resumed
    paused: bool

    def wake(self) -> None:
        """Pump the body again (a disk read came back, or its turn came round)."""


#: ``(bytes sent, error, fault)`` when a body ends: ``error`` is None, ``client_gone``,
#: ``client_stalled`` or ``aborted`` (the access line's ``error=``); ``fault``: what aborted it
#: (the disk's error, or a file shorter than its record)
Finish = Callable[[int, str | None, BaseException | None], None]


class Ending:
    """How a lane file body (regproxy.fastfile, regproxy.fastsend) ends, once: its stall timer
    stopped, what else it holds let go (``release``), its file closed unless a read on a worker
    still holds it (then when that read is back), and ``finish`` told what was sent."""

    __slots__ = ("error", "fd", "finish", "over", "reading", "release", "sent", "timer")

    def __init__(self, fd: int, finish: Finish, release: Callable[[], None]) -> None:
        self.fd = fd
        self.finish = finish
        self.release = release
        self.over = False
        self.error: str | None = None
        self.sent = 0
        self.reading = False  # a read on a worker thread is out (it holds the file)
        self.timer: asyncio.TimerHandle | None = None

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def arm_stall(self, out: Outlet, seconds: float) -> None:
        """Cut the body if the client takes nothing for ``seconds`` (``http.write_timeout``)."""
        if seconds > 0:
            self.timer = asyncio.get_running_loop().call_later(seconds, self._stalled, out)

    def _stalled(self, out: Outlet) -> None:
        self.timer = None
        if not self.over:
            self.cut(out.transport, "client_stalled", None)
            out.wake()

    def read_back(self) -> bool:
        """A worker's read is back: False (and the file closed) if the body ended meanwhile."""
        self.reading = False
        if self.over:
            os.close(self.fd)
            return False
        return True

    def lost(self) -> None:
        """The connection is gone with the body unfinished."""
        if not self.over:
            self.end("client_gone")

    def cut(
        self, transport: asyncio.Transport | None, error: str, exc: BaseException | None
    ) -> None:
        """Cut the response short: abort the connection, so no client takes it for whole."""
        self.end(error, exc)
        if transport is not None:
            transport.abort()

    def end(self, error: str | None, fault: BaseException | None = None) -> None:
        if self.over:
            return
        self.over = True
        self.error = error
        self.stop_timer()
        self.release()
        if not self.reading:
            os.close(self.fd)
        self.finish(self.sent, error, fault)


class LaneBody(Protocol):
    """A response the lane streams (regproxy.fastfile.FileBody): the guard pumps it until it
    says it is over, again whenever the transport resumes or the body wakes it."""

    #: how it ends: ``ending.error`` says why it was cut short (it aborted the connection),
    #: None when it went out whole; ``ending.lost()`` when the connection goes first
    ending: Ending

    def pump(self, out: Outlet) -> bool: ...


class Streams:
    """The connections whose lane body is still going (the guard keeps them here), which a
    stop waits for: aiohttp sees such a connection idle, and would close it at once."""

    def __init__(self) -> None:
        self.live: set[object] = set()
        self._idle: asyncio.Event | None = None

    def add(self, conn: object) -> None:
        self.live.add(conn)

    def discard(self, conn: object) -> None:
        self.live.discard(conn)
        if not self.live and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no body is going."""
        while self.live:
            self._idle = asyncio.Event()
            await self._idle.wait()


class FastLane(Protocol):
    """Answers some requests itself (regproxy.fastpath.FastPath)."""

    def answer(
        self, head: bytes, remote: str | None, followed: bool, files: str = ""
    ) -> tuple[bytes | LaneBody, bool] | None:
        """The whole response to a request head (its bytes before the empty line that ends
        it; the request has no body; ``followed``: more bytes came after it), or a body to
        stream (only where ``files`` says how: ``tls``, the connection's TLS is on the event
        loop; ``plain``, a TCP socket with nothing waiting in its transport), and whether the
        connection closes after it, or None: aiohttp is to answer it."""


_FRAMING: Final = (b"content-length", b"transfer-encoding", b"upgrade", b"expect")


def bodiless(head: bytes) -> bool:
    """Whether a request head (before its empty line) is a GET or HEAD in HTTP/1.1 that says
    nothing of a body or of the connection (but ``Connection: keep-alive`` or ``close``): after
    aiohttp answered it, the connection is at the next request, or closed. Conservative: a header that
    names a body or an upgrade anywhere, even in a value, counts."""
    line, _, rest = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD") or parts[2] != b"HTTP/1.1":
        return False
    lower = rest.lower()
    if not partial_head(head) or any(name in lower for name in _FRAMING):
        return False
    for field in lower.split(b"\r\n"):
        name, _, value = field.partition(b":")
        if b"connection" in name and value.strip(b" \t") not in (b"keep-alive", b"close"):
            return False
    return True


def partial_head(buf: bytes) -> bool:
    """Whether ``buf`` may be the start of a strict request head (lines ended by CRLF, no
    empty line yet, not too long): else it goes to aiohttp, which answers what it is."""
    if len(buf) < 5:
        return any(start.startswith(buf) for start in _FAST_STARTS)
    if not buf.startswith(_FAST_STARTS) or len(buf) > FAST_HEAD_MAX or b"\n\n" in buf:
        return False
    rest = buf.replace(b"\r\n", b"")
    return b"\n" not in rest and b"\r" not in (rest[:-1] if rest.endswith(b"\r") else rest)


__all__ = [
    "FAST_HEAD_MAX",
    "FastLane",
    "Ending",
    "Finish",
    "LaneBody",
    "Outlet",
    "Streams",
    "bodiless",
    "partial_head",
]
