"""TLS on the event loop itself (``tls.workers: 0``), with every failed handshake seen.

``loop.create_server(ssl=...)`` does the handshake out of sight: a client that fails it never
reaches the protocol, so the address of one OpenSSL refused is not known, and one that closed
or stayed silent in the middle is not seen at all. Here the event loop accepts each connection
(regproxy.accept_loop) and hands it to ``loop.connect_accepted_socket(ssl=...)`` in a task of
its own, which raises whatever ended the handshake: every failure is told with the client's
address (regproxy.tls_failures), as the TLS workers tell theirs. What follows a handshake is
``create_server``'s path: the same TLS layer of the loop, the protocol (the connection guard's)
made at the accept, so a handshake in progress counts against ``http.max_connections``, and
connected once the handshake is done.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import Any

from regproxy.accept_loop import Acceptor


class LoopTLS:
    """A TLS listener whose handshakes and records run on the event loop.

    ``context`` is called for each new connection (the certificate in force);
    ``protocol_factory`` is the listener's (the connection guard), called at each accept;
    ``on_handshake_failed`` is told (on the event loop) of each handshake that did not end,
    with the client's address and the exception that ended it."""

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext],
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        handshake_timeout: float,
        on_handshake_failed: Callable[[Any, BaseException], object] = lambda *_: None,
    ) -> None:
        self.context = context
        self.protocol_factory = protocol_factory
        self.handshake_timeout = handshake_timeout
        self.on_handshake_failed = on_handshake_failed
        self.loop = asyncio.get_running_loop()
        self._acceptor = Acceptor(self._take)
        #: handshakes in progress
        self._tasks: set[asyncio.Task[None]] = set()
        self.sockets: list[socket.socket] = []

    def listen(self, host: str, port: int, backlog: int = 1024) -> None:
        self._acceptor.listen(host, port, backlog)
        self.sockets = self._acceptor.sockets

    def _take(self, conn: socket.socket, extra: dict[str, Any]) -> None:
        protocol = self.protocol_factory()  # counted from here
        task = self.loop.create_task(self._handshake(conn, protocol, extra["peername"]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket, protocol: asyncio.Protocol, peer: Any) -> None:
        try:
            await self.loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self.context(),
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except asyncio.CancelledError:
            conn.close()  # a no-op once the loop's transport has taken the socket
            raise
        except Exception as exc:
            conn.close()
            self.on_handshake_failed(peer, exc)

    def close(self) -> None:
        """No new connections; handshakes still in progress end (connections already made
        go on until the server closes them)."""
        self._acceptor.close()
        for task in self._tasks:
            task.cancel()
