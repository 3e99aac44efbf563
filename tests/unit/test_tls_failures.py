"""Failed TLS handshakes are counted by reason and said at WARNING once a minute, with the
client's address where the TLS workers see it (regproxy.tls_failures): real clients on loopback
(plain HTTP to the TLS port, a client offering only TLS 1.0/1.1, one that does not trust the
certificate), against the event loop's own TLS and against the TLS workers."""

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


async def until(check: object) -> None:
    for _ in range(500):  # bounded: 5 s
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


async def test_the_event_loops_tls_counts_and_tells_each_reason_once_a_minute(
    tls: ServerTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "regproxy.tls")
    metrics, clock = Metrics(), Clock()
    tls.report_failures(HandshakeFailures(metrics.tls_handshake_failures, clock).failed)
    server = await asyncio.get_running_loop().create_server(
        asyncio.Protocol, "127.0.0.1", 0, ssl=tls.context
    )
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        assert set(counts(metrics).values()) == {0.0}  # every reason shown from the start
        await loop.run_in_executor(None, plain_http, port)
        await loop.run_in_executor(None, old_tls, port)
        await loop.run_in_executor(None, wrong_ca, tmp_path, port)
        want = {"not_tls": 1.0, "protocol_version": 1.0, "certificate_rejected": 1.0}
        await until(lambda: counts(metrics) == {r: want.get(r, 0.0) for r in REASONS})
        said = warnings(caplog)
        assert said == [
            "tls.handshake_failed remote=- reason=not_tls error=HTTP_REQUEST suppressed=0"
        ]
        clock.now += 61  # a minute on: the next one is said, with how many were not
        await loop.run_in_executor(None, plain_http, port)
        await until(lambda: len(warnings(caplog)) == 2)
        assert warnings(caplog)[1].endswith("reason=not_tls error=HTTP_REQUEST suppressed=2")
    finally:
        server.close()
        await server.wait_closed()


async def test_the_tls_workers_tell_the_clients_address(
    tls: ServerTLS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "regproxy.tls")

    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(text="hello")

    server = web.Server(handler)
    metrics = Metrics()
    guard = ConnectionGuard(server, HttpConfig(), 64, metrics)
    failures = HandshakeFailures(metrics.tls_handshake_failures)
    relay = TLSRelay(
        lambda: tls.context,
        guard,
        workers=1,
        handshake_timeout=30.0,
        write_timeout=30.0,
        on_handshake_failed=failures.failed,
    )
    relay.listen("127.0.0.1", 0)
    port = relay.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            local = s.getsockname()
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            await loop.run_in_executor(None, _drain, s)
        await loop.run_in_executor(None, wrong_ca, tmp_path, port)
        await until(lambda: counts(metrics)["certificate_rejected"] == 1.0)
        socket.create_connection(("127.0.0.1", port)).close()  # a health check: no warning
        await until(lambda: counts(metrics)["closed"] == 1.0)
        assert counts(metrics)["not_tls"] == 1.0
        assert warnings(caplog) == [
            f"tls.handshake_failed remote=127.0.0.1:{local[1]} reason=not_tls "
            "error=HTTP_REQUEST suppressed=0"
        ]
    finally:
        relay.stop()
        await server.shutdown(1.0)


def _drain(s: socket.socket) -> None:
    s.settimeout(10)
    while s.recv(4096):
        pass
