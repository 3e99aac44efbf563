"""A listener's accept loop on the event loop, for the TLS listeners that take each connection
themselves (regproxy.tls_relay, regproxy.tls_loop) instead of ``loop.create_server``'s.

Each listening socket is watched with ``add_reader``; a wake-up takes up to
:data:`ACCEPT_BATCH` connections, each made non-blocking with TCP keep-alive on (as aiohttp
does for the socket it is handed: a client whose host vanished is found out on an idle
connection) and handed on with its addresses. Out of descriptors (EMFILE/ENFILE), the socket
rests :data:`ACCEPT_REST_SECONDS` before it is watched again, as asyncio's own listener does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("regproxy.tls")

#: connections taken from the listening socket per wake-up at most
ACCEPT_BATCH: Final = 64
#: after EMFILE/ENFILE the listener rests this long before accepting again (as asyncio's)
ACCEPT_REST_SECONDS: Final = 1.0

#: told of each accepted connection: its socket, and ``{"peername": ..., "sockname": ...}``
Take = Callable[[socket.socket, dict[str, Any]], None]


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for ``host:port`` (as ``loop.create_server``)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            port = port or sock.getsockname()[1]  # one port for all, when the OS picks it
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


class Acceptor:
    """Accepts on the running event loop and hands each connection to ``take``."""

    def __init__(self, take: Take) -> None:
        self.take = take
        self.loop = asyncio.get_running_loop()
        self.sockets: list[socket.socket] = []
        self.closed = False

    def listen(self, host: str, port: int, backlog: int = 1024) -> None:
        self.sockets = listening_sockets(host, port, backlog)
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # out of descriptors: rest, then accept again
                log.warning("tls.accept_failed error=%s", exc)
                self.loop.remove_reader(sock.fileno())
                self.loop.call_later(ACCEPT_REST_SECONDS, self._resume, sock)
                return
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            try:
                extra = {"peername": peer, "sockname": conn.getsockname()}
            except OSError:  # gone already
                extra = {"peername": peer, "sockname": sock.getsockname()}
            self.take(conn, extra)

    def _resume(self, sock: socket.socket) -> None:
        if not self.closed:
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """No new connections (the listening sockets are closed)."""
        if self.closed:
            return
        self.closed = True
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
