"""A committed blob file sent by the fast lane (``http.fast_path``, regproxy.fastpath) over
TLS on the event loop, without aiohttp's request path around it.

Over TLS a 1 MiB blob costs the event loop ~1.0 µs per KiB (encryption, copies) and ~400 µs per
request, most of it aiohttp's request path (request and response objects, a task, routing,
middlewares, the handler): :class:`FileBody` is the body of such an answer, driven by the
connection's guard (regproxy.connections) as the transport takes it, as
``regproxy.sendfile``'s TLS path drives it through aiohttp:

- the head goes out with the first chunk; chunks of ``BLOB_CHUNK`` (256 KiB) are read with
  ``pread`` on the loop when the page cache holds them (a ``RWF_NOWAIT`` probe), else on a
  worker thread, and written while the transport has not asked to stop (``pause_writing``): a
  client that does not read holds what the slow path would hold (one chunk and the transport's
  buffers), never the whole file;
- a client that takes nothing for ``http.write_timeout`` is cut (``error=client_stalled``), one
  that goes away ends the body (``error=client_gone``), a file shorter than its record is cut
  (``error=aborted`` and a WARNING): the connection is aborted, so a client never takes a short
  body for a whole one;
- the requests behind it on the connection wait for it (the guard holds their bytes);
- its access line, request metrics and bytes served are counted when it ends, as aiohttp's
  access logger and ``sendfile.send_file`` count them.
"""

from __future__ import annotations

import asyncio
import os
from typing import Final

from regproxy.lane import Ending, Finish, Outlet
from regproxy.sendfile import readable_now
from regproxy.units import BLOB_CHUNK

#: bytes sent to one client before the loop serves others (as ``sendfile.TURN``)
TURN: Final = 4 * 1024 * 1024


class FileBody:
    """The head and ``count`` bytes of an open blob file, written as the transport takes them.

    It owns ``fd`` and closes it when it ends (or, with a read on a worker still out, when that
    read is back). The guard calls :meth:`pump` until it returns True, and :meth:`lost` if the
    connection goes first.
    """

    __slots__ = ("count", "ending", "head", "offset", "ready", "write_timeout")

    def __init__(
        self, head: bytes, fd: int, count: int, write_timeout: float, finish: Finish
    ) -> None:
        self.head = head
        self.offset = 0
        self.count = count
        self.write_timeout = write_timeout
        self.ready: bytes | None = None  # what a read on a worker brought back
        self.ending = Ending(fd, finish, self._release)

    def pump(self, out: Outlet) -> bool:
        """Write what the transport takes now; True once the body is over (whole or cut)."""
        e = self.ending
        if e.over:
            return True
        e.stop_timer()
        transport = out.transport
        turn = 0
        while self.count > 0:
            if transport is None or transport.is_closing():
                e.end("client_gone")
                return True
            if out.paused:
                e.arm_stall(out, self.write_timeout)
                return False
            if e.reading:
                return False
            if turn >= TURN:
                asyncio.get_running_loop().call_soon(out.wake)
                return False
            n = min(BLOB_CHUNK, self.count)
            chunk, self.ready = self.ready, None
            try:
                if chunk is None:
                    if not readable_now(e.fd, self.offset, n):
                        self._read_in(out, n)
                        return False
                    chunk = os.pread(e.fd, n, self.offset)
            except OSError as exc:
                e.cut(transport, "aborted", exc)
                return True
            if not chunk:
                e.cut(transport, "aborted", EOFError("blob file is shorter than its record"))
                return True
            if self.head:
                transport.writelines((self.head, chunk))
                self.head = b""
            else:
                transport.write(chunk)
            self.offset += len(chunk)
            self.count -= len(chunk)
            e.sent += len(chunk)
            turn += len(chunk)
        e.end(None)
        return True

    def _read_in(self, out: Outlet, n: int) -> None:
        """Read the next chunk on a worker thread (the disk may wait), then pump again."""
        e = self.ending
        e.reading = True
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, os.pread, e.fd, n, self.offset)

        def back(f: asyncio.Future[bytes]) -> None:
            if not e.read_back():  # the connection went meanwhile
                return
            exc = ConnectionAbortedError("read cancelled") if f.cancelled() else f.exception()
            if exc is not None:
                e.cut(out.transport, "aborted", exc)
            else:
                self.ready = f.result()
            out.wake()

        future.add_done_callback(back)

    def _release(self) -> None:
        self.ready = None


__all__ = ["FileBody"]
