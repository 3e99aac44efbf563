"""``http.max_connections`` counts a TLS connection from its accept, not from the end of its
handshake: connections that never finish a handshake hold a place (and a descriptor) until
``http.header_timeout``, and give it back when they go, handshake or not."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl

import pytest

from regproxy.config import HttpConfig
from regproxy.connections import ConnectionGuard
from regproxy.metrics import Metrics
from regproxy.tls_loop import LoopTLS
from tests.certs import self_signed


class _Hello(asyncio.Protocol):
    """The connection's own protocol (aiohttp's, in the daemon): answers one line."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(b"hello\n")


@pytest.fixture(scope="module")
def server_ssl(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A throw-away self-signed certificate for 127.0.0.1, made in this process."""
    cert, key = self_signed(tmp_path_factory.mktemp("tls"), "server")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _until(cond: object, what: str) -> None:
    for _ in range(500):  # bounded: 5 s at most
        gc.collect()  # a dropped protocol goes now, not at the next collection
        if callable(cond) and cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


async def _tls_hello(port: int) -> bytes:
    client = ssl.create_default_context()
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_tls_handshakes_in_progress_count_and_give_their_place_back(
    server_ssl: ssl.SSLContext,
) -> None:
    metrics = Metrics()
    guard = ConnectionGuard(_Hello, HttpConfig(header_timeout=1.0), 2, metrics)
    server = LoopTLS(lambda: server_ssl, guard, handshake_timeout=30)  # tls.workers: 0
    server.listen("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent: list[socket.socket] = []
    try:
        # two clients that connect and never start their handshake take both places
        for _ in range(2):
            silent.append(socket.create_connection(("127.0.0.1", port)))
        await _until(lambda: guard.open == 2, "two connections counted")
        # the third finishes its handshake and is refused: 503, the limit's answer
        assert b" 503 " in await _tls_hello(port)
        assert metrics.connections_shed._value.get() == 1
        # the silent two go without a handshake: their places come back
        for s in silent:
            s.close()
        silent.clear()
        await _until(lambda: guard.open == 0, "the places given back")
        # and a client is served again, counted while connected
        assert await _tls_hello(port) == b"hello\n"
        await _until(lambda: guard.open == 0, "the served client's place given back")
    finally:
        for s in silent:
            s.close()
        server.close()


async def test_plain_connections_are_counted_as_before() -> None:
    guard = ConnectionGuard(_Hello, HttpConfig(header_timeout=1.0), 1, Metrics())
    server = await asyncio.get_running_loop().create_server(guard, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readline() == b"hello\n"
        assert guard.open == 1
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        assert b" 503 " in await asyncio.wait_for(r2.read(4096), 5)
        w2.close()
        writer.close()
        await _until(lambda: guard.open == 0, "the place given back")
    finally:
        server.close()
        await server.wait_closed()
