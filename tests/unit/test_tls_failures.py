"""Failed TLS handshakes are counted by reason and said at WARNING once a minute, with the
client's address (regproxy.tls_failures): real clients on loopback (plain HTTP to the TLS port,
a client offering only TLS 1.0/1.1, one that does not trust the certificate, a health check that
closes, one that says nothing), against the event loop's own TLS and against the TLS workers."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path

import pytest
from aiohttp import web

from regproxy.config import HttpConfig
from regproxy.connections import ConnectionGuard
from regproxy.metrics import Metrics
from regproxy.tls import ServerTLS
from regproxy.tls_failures import REASONS, HandshakeFailures
from regproxy.tls_loop import LoopTLS
from regproxy.tls_relay import TLSRelay
from tests.certs import self_signed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tls(tmp_path: Path) -> ServerTLS:
    cert, key = self_signed(tmp_path, "server")
    self_signed(tmp_path, "stranger")  # a CA the clients below trust instead
    return ServerTLS(str(cert), str(key))


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        while s.recv(4096):
            pass


def old_tls(port: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with pytest.warns(DeprecationWarning):
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    handshake(ctx, port)


def wrong_ca(tmp_path: Path, port: int) -> None:
    handshake(ssl.create_default_context(cafile=str(tmp_path / "stranger.crt")), port)


def handshake(ctx: ssl.SSLContext, port: int) -> None:
    """A blocking client, as curl's or Go's: it sends its alert before it closes."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(OSError),
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.recv(1)


def counts(metrics: Metrics) -> dict[str, float]:
    return {
        r: metrics.registry.get_sample_value("regproxy_tls_handshake_failures_total", {"reason": r})
        or 0.0
        for r in REASONS
    }


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "tls.handshake_failed" in r.getMessage()
    ]


def debug_reasons(caplog: pytest.LogCaptureFixture) -> set[str]:
    """The reasons of the failures said at DEBUG with an address (not "-")."""
    said = (r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    return {
        m.split(" reason=")[1].split()[0]
        for m in said
        if m.startswith("tls.handshake_failed remote=127.0.0.1:")
    }


async def until(check: object) -> None:
    for _ in range(500):  # bounded: 5 s
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


class Listener:
    """The daemon's TLS listener of one kind on a port of its own: the event loop's
    (``tls.workers: 0``, regproxy.tls_loop) or the workers' (regproxy.tls_relay)."""

    def __init__(self, kind: str, tls: ServerTLS, failures: HandshakeFailures) -> None:
        async def handler(request: web.BaseRequest) -> web.Response:
            return web.Response(text="hello")

        self.server = web.Server(handler)
        guard = ConnectionGuard(self.server, HttpConfig(), 64, Metrics())
        self.listener: LoopTLS | TLSRelay
        if kind == "loop":
            self.listener = LoopTLS(
                lambda: tls.context,
                guard,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                on_handshake_failed=failures.failed,
            )
        else:
            self.listener = TLSRelay(
                lambda: tls.context,
                guard,
                workers=1,
                handshake_timeout=HANDSHAKE_TIMEOUT,
                write_timeout=30.0,
                on_handshake_failed=failures.failed,
            )
        self.listener.listen("127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if isinstance(self.listener, TLSRelay):
            self.listener.stop()
        else:
            self.listener.close()
        await self.server.shutdown(1.0)


#: a client silent this long in its handshake is cut (the daemon's: http.header_timeout)
HANDSHAKE_TIMEOUT = 1.5


@pytest.mark.parametrize("kind", ["loop", "workers"])
async def test_every_failed_handshake_is_counted_and_told_with_the_clients_address(
    kind: str, tls: ServerTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "regproxy.tls")
    metrics, clock = Metrics(), Clock()
    listener = Listener(kind, tls, HandshakeFailures(metrics.tls_handshake_failures, clock))
    port = listener.port
    loop = asyncio.get_running_loop()
    try:
        assert set(counts(metrics).values()) == {0.0}  # every reason shown from the start
        silent = socket.create_connection(("127.0.0.1", port))  # says nothing: cut in time
        with socket.create_connection(("127.0.0.1", port)) as s:
            local = s.getsockname()
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            await loop.run_in_executor(None, _drain, s)
        await loop.run_in_executor(None, old_tls, port)
        await loop.run_in_executor(None, wrong_ca, tmp_path, port)
        socket.create_connection(("127.0.0.1", port)).close()  # a health check: no warning
        want = {
            "not_tls": 1.0,
            "protocol_version": 1.0,
            "certificate_rejected": 1.0,
            "closed": 1.0,
            "timeout": 1.0,
        }
        await until(lambda: counts(metrics) == {r: want.get(r, 0.0) for r in REASONS})
        silent.close()
        # said at DEBUG (a worker logs just after it counts), each with the client's address
        await until(lambda: {"closed", "timeout"} <= debug_reasons(caplog))
        assert warnings(caplog) == [
            f"tls.handshake_failed remote=127.0.0.1:{local[1]} reason=not_tls "
            "error=HTTP_REQUEST suppressed=0"
        ]
        clock.now += 61  # a minute on: the next one is said, with how many were not
        await loop.run_in_executor(None, plain_http, port)
        await until(lambda: len(warnings(caplog)) == 2)
        assert warnings(caplog)[1].endswith("reason=not_tls error=HTTP_REQUEST suppressed=2")
        # a client that completes its handshake is served as plain HTTP is
        ctx = ssl.create_default_context(cafile=str(tmp_path / "server.crt"))
        ctx.check_hostname = False  # the test certificate names 127.0.0.1 only as its CN
        assert await loop.run_in_executor(None, _get, ctx, port) == b"hello"
    finally:
        await listener.stop()


def _get(ctx: ssl.SSLContext, port: int) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data.split(b"\r\n\r\n", 1)[1]


def _drain(s: socket.socket) -> None:
    s.settimeout(10)
    while s.recv(4096):
        pass
