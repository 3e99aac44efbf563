"""A committed blob file sent by the fast lane (``http.fast_path``, regproxy.fastpath) over
plain HTTP with ``sendfile(2)``, without aiohttp's request path around it.

Over plain HTTP aiohttp's path sends a blob file with ``sendfile`` (regproxy.sendfile) and costs
~300 CPU-µs per request around it. :class:`SendfileBody` is the same body driven by the
connection's guard (regproxy.connections), as ``sendfile._sendfile`` drives it:

- the guard hands it a connection only while nothing waits in the transport's buffer; the head
  is written to the socket itself, then the file with ``sendfile`` on a twin of the socket's
  descriptor (the loop watches the transport's own) until the socket is full (``EAGAIN``), then
  again when it is writable (``add_writer`` on the twin); at most ``TURN`` bytes per wake-up;
- before each ``WINDOW`` of the file, a ``RWF_NOWAIT`` probe asks whether its pages are cached;
  if not, a worker thread reads it in first (a bounded disk read, not the client's pace);
- a client that takes nothing for ``http.write_timeout`` is cut (``error=client_stalled``), one
  that goes away ends the body (``error=client_gone``), a file shorter than its record is cut
  (``error=aborted``): the connection is aborted, so a client never takes a short body for a
  whole one; its access line, request metrics and bytes served are counted when it ends.
"""

from __future__ import annotations

import asyncio
import os

from regproxy.lane import Ending, Finish, Outlet
from regproxy.sendfile import CLIENT_GONE, TURN, WINDOW, in_page_cache, read_in


class SendfileBody:
    """The head and ``count`` bytes of an open blob file, sent with ``sendfile`` as the socket
    takes them. It owns ``fd`` (closed when it ends, or when a worker's read is back)."""

    __slots__ = (
        "count",
        "ending",
        "head",
        "offset",
        "out",
        "waiting",
        "warm_until",
        "write_timeout",
    )

    def __init__(
        self, head: bytes, fd: int, count: int, write_timeout: float, finish: Finish
    ) -> None:
        self.head = head
        self.offset = 0
        self.count = count
        self.write_timeout = write_timeout
        self.out = -1  # the twin of the socket's descriptor
        self.waiting = False  # the loop watches the twin for room
        self.warm_until = 0
        self.ending = Ending(fd, finish, self._release)

    def pump(self, out: Outlet) -> bool:
        """Send what the socket takes now; True once the body is over (whole or cut)."""
        e = self.ending
        if e.over:
            return True
        self._unwait()
        transport = out.transport
        if transport is None or transport.is_closing():
            e.end("client_gone")
            return True
        if e.reading:
            return False
        turn = 0
        try:
            if self.out < 0:
                self.out = os.dup(transport.get_extra_info("socket").fileno())
            while self.head:  # nothing waits in the transport (the guard saw to it)
                self.head = self.head[os.write(self.out, self.head) :]
            while self.count > 0:
                if self.offset >= self.warm_until:
                    window = min(WINDOW, self.count)
                    if not in_page_cache(e.fd, self.offset, window):
                        self._read_in(out, window)
                        return False
                    self.warm_until = self.offset + window
                if turn >= TURN:
                    asyncio.get_running_loop().call_soon(out.wake)
                    return False
                n = os.sendfile(self.out, e.fd, self.offset, self.warm_until - self.offset)
                if n == 0:
                    short = EOFError("blob file is shorter than its record")
                    e.cut(transport, "aborted", short)
                    return True
                self.offset += n
                self.count -= n
                e.sent += n
                turn += n
        except BlockingIOError:
            self._wait(out)
            return False
        except CLIENT_GONE:
            e.cut(transport, "client_gone", None)
            return True
        except OSError as exc:
            e.cut(transport, "aborted", exc)
            return True
        e.end(None)
        return True

    def _wait(self, out: Outlet) -> None:
        """Pump again when the socket has room; cut it if that takes ``write_timeout``."""
        asyncio.get_running_loop().add_writer(self.out, out.wake)
        self.waiting = True
        self.ending.arm_stall(out, self.write_timeout)

    def _unwait(self) -> None:
        if self.waiting:
            self.waiting = False
            asyncio.get_running_loop().remove_writer(self.out)
        self.ending.stop_timer()

    def _read_in(self, out: Outlet, window: int) -> None:
        """Bring the next window into the page cache on a worker thread, then pump again."""
        e = self.ending
        e.reading = True
        future = asyncio.get_running_loop().run_in_executor(
            None, read_in, e.fd, self.offset, window
        )
        end = self.offset + window

        def back(f: asyncio.Future[None]) -> None:
            if not e.read_back():  # the connection went meanwhile
                return
            exc = ConnectionAbortedError("read cancelled") if f.cancelled() else f.exception()
            if exc is not None:
                e.cut(out.transport, "aborted", exc)
            else:
                self.warm_until = end
            out.wake()

        future.add_done_callback(back)

    def _release(self) -> None:
        """The socket's twin goes when the body ends."""
        self._unwait()
        if self.out >= 0:
            os.close(self.out)
            self.out = -1


__all__ = ["SendfileBody"]
