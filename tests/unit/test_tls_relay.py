"""TLS relayed by worker threads (regproxy.tls_relay): what the application sees of a
connection is the client's (address, https), the connection guard still counts from the accept,
flow control holds both ways, ends and aborts go through, and nothing is left behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from regproxy.app import tls_workers
from regproxy.config import HttpConfig, config_from_dict
from regproxy.connections import ConnectionGuard
from regproxy.metrics import Metrics
from regproxy.tls import ServerTLS
from regproxy.tls_relay import TLSRelay
from tests.certs import self_signed

MiB = 1024 * 1024


def _write_cert(d: Path, org: str) -> tuple[Path, Path]:
    return self_signed(d, org, org)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d: Path = tmp_path_factory.mktemp("relay-tls")
    _write_cert(d, "first")
    _write_cert(d, "second")
    return d


def _client() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _until(cond: Callable[[], bool], what: str) -> None:
    for i in range(500):  # bounded: 5 s at most
        if i % 20 == 0:
            gc.collect()  # a dropped protocol goes now, not at the next collection
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached: {what}")


def _fd_list() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Served:
    """An aiohttp server behind the connection guard, its TLS relayed by two workers."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], object],
        limit: int = 64,
        http: HttpConfig | None = None,
    ) -> None:
        self.server = web.Server(handler)  # type: ignore[arg-type]
        self.metrics = Metrics()
        self.http = http or HttpConfig()
        self.guard = ConnectionGuard(self.server, self.http, limit, self.metrics)
        self.relay: TLSRelay | None = None

    def start(self, context: Callable[[], ssl.SSLContext], timeout: float = 30.0) -> int:
        self.relay = TLSRelay(
            context,
            self.guard,
            workers=2,
            handshake_timeout=timeout,
            write_timeout=self.http.write_timeout,
            on_write_cut=self.metrics.slow_clients_cut.labels("write").inc,
        )
        self.relay.listen("127.0.0.1", 0)
        return int(self.relay.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        await self.server.shutdown(1.0)
        if self.relay is not None:
            self.relay.stop()


@pytest.fixture
async def served() -> AsyncIterator[Callable[..., _Served]]:
    made: list[_Served] = []

    def make(*args: object, **kwargs: object) -> _Served:
        s = _Served(*args, **kwargs)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield make
    for s in made:
        await s.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("regproxy-tls")]


def _answer(body: bytes) -> Callable[[web.BaseRequest], object]:
    async def handler(request: web.BaseRequest) -> web.Response:
        return web.Response(body=body)

    return handler


def _context(certs: Path, org: str = "first") -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / f"{org}.crt", certs / f"{org}.key")
    return ctx


async def _get(port: int, path: str) -> tuple[bytes, bytes, socket.socket | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
    local = writer.get_extra_info("sockname")
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), 5)
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body, local


async def test_the_app_sees_the_clients_address_and_https(
    certs: Path, served: Callable[..., _Served]
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/go":
            raise web.HTTPFound("/there")
        return web.Response(
            text=f"{request.remote} {request.transport.get_extra_info('peername')[1]} "  # type: ignore[union-attr]
            f"{request.secure} {request.scheme} {request.url}"
        )

    s = served(handler)
    port = s.start(lambda: _context(certs))
    head, body, local = await _get(port, "/who")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert local is not None
    assert body.decode() == f"127.0.0.1 {local[1]} True https https://127.0.0.1/who"
    head, _, _ = await _get(port, "/go")
    assert b"302" in head.split(b"\r\n")[0] and b"Location: /there" in head


async def test_handshakes_in_progress_count_and_give_their_place_back(
    certs: Path, served: Callable[..., _Served]
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="hello")

    s = served(handler, limit=2)
    port = s.start(lambda: _context(certs), timeout=30.0)
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        await _until(lambda: s.guard.open == 2, "two connections counted from the accept")
        head, _, _ = await _get(port, "/")
        assert b" 503 " in head  # the limit's answer, over TLS
        for sock in silent:
            sock.close()
        await _until(lambda: s.guard.open == 0, "the places given back")
        head, body, _ = await _get(port, "/")
        assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
        await _until(lambda: s.guard.open == 0, "the served client's place given back")
    finally:
        for sock in silent:
            sock.close()


async def test_a_handshake_that_never_comes_is_cut(
    certs: Path, served: Callable[..., _Served]
) -> None:
    s = served(_answer(b"x"))
    port = s.start(lambda: _context(certs), timeout=0.2)
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        await _until(lambda: s.guard.open == 1, "counted")
        await _until(lambda: s.guard.open == 0, "cut after the handshake timeout")
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed by the server
    finally:
        silent.close()


async def test_a_slow_reader_holds_back_the_writer_and_gets_every_byte(
    certs: Path, served: Callable[..., _Served]
) -> None:
    body = os.urandom(MiB)
    total = 48 * MiB
    written = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal written
        resp = web.StreamResponse()
        resp.content_length = total
        await resp.prepare(request)
        for _ in range(total // MiB):
            await resp.write(body)
            written += MiB
        return resp

    s = served(handler)
    port = s.start(lambda: _context(certs))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=_client(), limit=64 * 1024
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    # the client reads nothing: the writer stops well short of the whole body (the socket
    # buffers and the relay's high-water marks bound what waits in between)
    await _until(lambda: written >= 2 * MiB, "the response started")
    before = -1
    while before != written:  # until it stops moving
        before = written
        await asyncio.sleep(0.2)
    assert written < 24 * MiB
    h = hashlib.sha256()
    got = 0
    while got < total:
        chunk = await asyncio.wait_for(reader.read(MiB), 10)
        assert chunk
        h.update(chunk)
        got += len(chunk)
    assert got == total and h.digest() == hashlib.sha256(body * (total // MiB)).digest()
    writer.close()


async def test_ends_and_aborts_go_through(certs: Path, served: Callable[..., _Served]) -> None:
    seen = asyncio.Event()
    gone = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/cut":
            resp = web.StreamResponse()
            resp.content_length = 10 * MiB
            await resp.prepare(request)
            await resp.write(b"x" * MiB)
            assert request.transport is not None
            request.transport.abort()  # a response cut short
            return resp
        seen.set()
        transport = request.transport
        assert transport is not None
        while not transport.is_closing():  # bounded by the test's own wait below
            await asyncio.sleep(0.01)
        gone.set()
        return web.Response()

    s = served(handler)
    port = s.start(lambda: _context(certs))
    # the client goes away in the middle of a request: the app sees its connection end
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
    writer.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(seen.wait(), 5)
    writer.transport.abort()
    await asyncio.wait_for(gone.wait(), 5)
    await _until(lambda: s.guard.open == 0, "its place given back")
    # the app aborts: the client sees the connection end before the whole body
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
    writer.write(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
        while True:
            chunk = await asyncio.wait_for(reader.read(MiB), 5)
            if not chunk:
                raise asyncio.IncompleteReadError(got, None)
            got += chunk
    assert len(got) < 10 * MiB
    writer.close()


async def test_many_connections_leave_no_descriptor_or_thread(
    certs: Path, served: Callable[..., _Served]
) -> None:
    s = served(_answer(b"y" * 100_000))
    port = s.start(lambda: _context(certs))
    for _ in range(5):  # warm: the loops' own descriptors are made
        await _get(port, "/")
    await _until(lambda: s.guard.open == 0, "idle")
    before = _fds()
    for _ in range(20):
        head, body, _ = await _get(port, "/")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == 100_000
    await _until(lambda: s.guard.open == 0, "every place given back")
    try:
        await _until(lambda: _fds() == before, f"descriptors back to {before}")
    except AssertionError:
        raise AssertionError(f"{before} descriptors before, now: {_fd_list()}") from None
    assert s.relay is not None
    await _until(lambda: not any(w.pairs for w in s.relay.workers), "the workers forgot them")


async def test_a_reloaded_certificate_is_served_to_new_connections(
    certs: Path, served: Callable[..., _Served], tmp_path: Path
) -> None:
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes((certs / "first.crt").read_bytes())
    live_key.write_bytes((certs / "first.key").read_bytes())
    server_tls = ServerTLS(str(live_cert), str(live_key))
    server_tls.swap = True
    s = served(_answer(b"ok"))
    port = s.start(lambda: server_tls.context)

    async def org() -> str:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True)
        writer.close()
        name = x509.load_der_x509_certificate(der).subject
        return str(name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)

    assert await org() == "first"
    live_cert.write_bytes((certs / "second.crt").read_bytes())
    live_key.write_bytes((certs / "second.key").read_bytes())
    assert server_tls.reload()
    assert await org() == "second"
    live_cert.write_text("broken\n")
    assert not server_tls.reload()
    assert await org() == "second"


async def _stuck_client(
    port: int, request: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS client that sends ``request`` and then reads nothing (a small receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=_client(), server_hostname="127.0.0.1", limit=16 * 1024
    )
    writer.write(request)
    writer.transport.pause_reading()
    return reader, writer


@pytest.mark.parametrize("size", [4 * MiB, 24 * MiB])
async def test_a_client_that_takes_nothing_is_cut_after_the_write_timeout(
    certs: Path, served: Callable[..., _Served], size: int
) -> None:
    # an answer written whole (a 4 MiB manifest) to a client that reads none of it: 4 MiB go
    # into the socket pair and the TCP buffers, the event loop's side is done and the client's
    # connection was held until the keep-alive ran out (and the TLS shutdown's 30 s); 24 MiB
    # stall on the event loop's side, which is cut after http.write_timeout, and the relay held
    # the client's connection for ever (its end of the pair no longer read), outside
    # http.max_connections. Both are cut after http.write_timeout, as without the relay.
    s = served(_answer(os.urandom(size)), http=HttpConfig(write_timeout=0.5))
    port = s.start(lambda: _context(certs))
    reader, writer = await _stuck_client(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.relay is not None
    await _until(lambda: any(w.pairs for w in s.relay.workers), "relayed")  # type: ignore[union-attr]
    await _until(lambda: s.guard.open == 0, "the event loop's side cut")
    await _until(lambda: not any(w.pairs for w in s.relay.workers), "the relay let it go")  # type: ignore[union-attr]
    writer.transport.resume_reading()
    got = 0
    with contextlib.suppress(ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        while chunk := await asyncio.wait_for(reader.read(MiB), 5):
            got += len(chunk)
    assert got < size  # the end came before the whole answer
    writer.close()
    cut = s.metrics.slow_clients_cut.labels("write")._value.get()
    assert cut >= 1  # counted (for 4 MiB by the worker: the event loop's side saw nothing)


async def test_out_of_descriptors_for_the_pair_gives_the_place_back(
    certs: Path, served: Callable[..., _Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a worker that cannot make the connection's socket pair (EMFILE under a flood of
    # connections) closes the client's connection and gives its place back: the place was held
    # for ever (the protocol kept in the relay's pending table), the client's socket left open
    s = served(_answer(b"ok"))
    port = s.start(lambda: _context(certs))
    real = socket.socketpair
    failed = []

    def out_of_descriptors(*args: object) -> tuple[socket.socket, socket.socket]:
        if not failed:
            failed.append(True)
            raise OSError(24, "Too many open files")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socketpair", out_of_descriptors)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await _until(lambda: bool(failed), "the pair refused")
    await _until(lambda: s.guard.open == 0, "its place given back")
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        assert await asyncio.wait_for(reader.read(100), 5) == b""  # closed by the server
    writer.close()
    assert s.relay is not None
    await _until(lambda: not any(w.pairs for w in s.relay.workers), "the worker forgot it")  # type: ignore[union-attr]
    head, body, _ = await _get(port, "/")
    assert head.startswith(b"HTTP/1.1 200") and body == b"ok"


async def test_the_clients_connection_has_tcp_keepalive_as_aiohttp_sets_it(
    certs: Path, served: Callable[..., _Served]
) -> None:
    # aiohttp turns SO_KEEPALIVE on for the socket it is handed: with the relay that is the
    # socket pair's end, so the relay sets it on the client's socket (a host that vanished
    # is found out, as without the relay)
    s = served(_answer(b"ok"))
    port = s.start(lambda: _context(certs))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=_client())
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"ok")
    assert s.relay is not None
    (pair,) = [p for w in s.relay.workers for p in w.pairs]
    assert pair.tls is not None
    sock = pair.tls.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    writer.close()


async def test_a_connection_counts_until_the_worker_lets_the_client_go(
    certs: Path, served: Callable[..., _Served]
) -> None:
    # the event loop is done with a connection (its answer handed on, Connection: close) while
    # the worker still holds the client's (flushing to a client that reads slowly, or waiting
    # for its close_notify up to 30 s): it counts against http.max_connections until then, as
    # without the relay; it was uncounted, so clients holding such connections went past the
    # limit (and its descriptors) without bound
    s = served(_answer(os.urandom(200_000)), limit=1)
    port = s.start(lambda: _context(certs))
    _, writer = await _stuck_client(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert s.relay is not None
    workers = s.relay.workers

    def main_side_done() -> bool:
        return any(p.plain is not None and p.plain.is_closing() for w in workers for p in w.pairs)

    await _until(main_side_done, "the event loop closed its end, the worker holds the client's")
    assert s.guard.open == 1
    head, _, _ = await _get(port, "/")
    assert b" 503 " in head  # over the limit
    writer.transport.abort()
    await _until(lambda: s.guard.open == 0, "its place given back once the client is gone")
    head, _, _ = await _get(port, "/")
    assert head.startswith(b"HTTP/1.1 200")


async def test_a_worker_that_died_is_passed_over_and_said(
    certs: Path, served: Callable[..., _Served], caplog: pytest.LogCaptureFixture
) -> None:
    # a worker whose loop ended (a bug) no longer takes connections: every other TLS client
    # was closed at the accept, silently; the others serve them, and the log says so once
    s = served(_answer(b"ok"))
    port = s.start(lambda: _context(certs))
    assert s.relay is not None
    dead = s.relay.workers[0]
    dead.loop.call_soon_threadsafe(dead.loop.stop)
    dead.thread.join(5)
    assert not dead.thread.is_alive()
    for _ in range(4):
        head, body, _ = await _get(port, "/")
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
    assert [r.message for r in caplog.records].count(
        f"tls.worker_gone name={dead.thread.name}"
    ) == 1


@pytest.mark.parametrize(
    ("workers", "cpus", "threads"),
    [(None, 1, 0), (None, 2, 0), (None, 4, 4), (None, 64, 8), (3, 2, 3), (0, 16, 0)],
)
def test_tls_workers_by_default_only_above_two_cpus(
    workers: int | None, cpus: int, threads: int
) -> None:
    """On 2 CPUs, with the client on the same host, the workers were no faster and dearer
    (benchmarks/ab_tls): the event loop does TLS there unless tls.workers says otherwise."""
    tls: dict[str, object] = {"cert": "/c.pem", "key": "/k.pem"}
    if workers is not None:
        tls["workers"] = workers
    assert tls_workers(config_from_dict({"tls": tls}), cpus=cpus) == threads
