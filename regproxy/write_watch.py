"""Connections whose answers wait in memory for a client that takes none of them (HTTP layer).

Blob bodies sent with ``sendfile`` or in chunks keep their own ``http.write_timeout``
(regproxy.sendfile), and so do those the fast lane streams (regproxy.lane's ``Ending``: the guard
takes their connection out of the watch while one goes out, so a stalled client is cut once). Everything else is one write into the connection's transport: a manifest
(up to 4 MiB), a small blob, an error, a tags list, the web page, the fast lane's answers. A
client that sends its request and then never reads leaves those bytes in the transport's buffer,
and aiohttp's handler waiting for them to drain, for as long as the connection lives: nothing
closes it (aiohttp's keep-alive clock does not run while a response is unfinished, and a
``close()`` waits for the buffer to empty). Many such clients hold connections and memory.

:class:`WriteWatch` looks at the guard's connections every quarter of ``http.write_timeout``
(at most every 5 s): one with bytes waiting whose client took none of them (the buffer did not
shrink and, on TCP, the kernel saw no new bytes acknowledged) for ``write_timeout`` is aborted,
counted in ``regproxy_http_slow_clients_cut_total{phase="write"}`` and logged. A client that
reads, however slowly, is never cut by it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import Final, Protocol

log = logging.getLogger("regproxy")

#: ``struct tcp_info`` up to and including ``tcpi_bytes_acked`` (Linux 4.1+), and its offset
_TCP_INFO_LEN: Final = 128
_BYTES_ACKED_AT: Final = 120
_SWEEP_MAX: Final = 5.0
_SWEEP_MIN: Final = 0.05


class Watched(Protocol):
    """A connection the watch looks at (the guard's protocol for it)."""

    transport: asyncio.Transport | None
    #: the watch's notes: when the client last took bytes, and what it had then
    stalled_since: float | None
    stalled_mark: tuple[int, int]

    def peer(self) -> object:
        """The client's address, for the log line."""
        ...


def acked(transport: asyncio.BaseTransport) -> int:
    """Bytes the client's TCP acknowledged so far (0 where the kernel does not say)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0
    if len(info) < _BYTES_ACKED_AT + 8:
        return 0
    return int(struct.unpack_from("Q", info, _BYTES_ACKED_AT)[0])


class WriteWatch:
    """Aborts connections that took none of their waiting bytes for ``timeout`` seconds."""

    def __init__(
        self,
        timeout: float,
        clock: Callable[[], float],
        on_cut: Callable[[], None],
        progress: Callable[[asyncio.BaseTransport], int] = acked,
    ) -> None:
        self.timeout = timeout
        self.clock = clock
        self.on_cut = on_cut
        self.progress = progress
        self.live: set[Watched] = set()
        self.interval = min(_SWEEP_MAX, max(_SWEEP_MIN, timeout / 4))
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: Watched) -> None:
        conn.stalled_since = None
        self.live.add(conn)
        if self._timer is None and self.timeout > 0:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def discard(self, conn: Watched) -> None:
        self.live.discard(conn)

    def _tick(self) -> None:
        self._timer = None
        self.sweep()
        if self.live:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def sweep(self) -> int:
        """Look at every connection once; the number aborted."""
        now = self.clock()
        cut = 0
        for conn in list(self.live):
            transport = conn.transport
            if transport is None:
                continue
            waiting = transport.get_write_buffer_size()
            if waiting == 0:
                conn.stalled_since = None
                continue
            mark = (waiting, self.progress(transport))
            last = conn.stalled_mark
            if conn.stalled_since is None or mark[0] < last[0] or mark[1] != last[1]:
                conn.stalled_since, conn.stalled_mark = now, mark  # the client took bytes
                continue
            conn.stalled_mark = mark
            if now - conn.stalled_since < self.timeout:
                continue
            log.info(
                "connection.write_stalled remote=%s waiting_bytes=%d seconds=%.0f",
                conn.peer(),
                waiting,
                now - conn.stalled_since,
            )
            self.on_cut()
            self.live.discard(conn)
            transport.abort()
            cut += 1
        return cut

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
