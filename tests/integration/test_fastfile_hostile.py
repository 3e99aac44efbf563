"""Hostile clients against a blob body the lane streams (regproxy.fastfile, regproxy.fastsend),
on asyncio's loop and on uvloop (the daemon's loop: tests/inproc.py runs asyncio's), over TLS
and plain HTTP (from a hostile review of the lane's blob bodies).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from tests.certs import self_signed
from tests.images import sha256
from tests.inproc import AppDaemon
from tests.integration.test_fastfile import (
    BIG,
    FAST,
    TLS,
    TLSConn,
    metric,
    put_blob,
    settled,
    start,
    tls,  # noqa: F401  (the fixture)
)
from tests.integration.test_fastpath import CREDENTIALS, REPO, request
from tests.peers import Daemon


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The app's loop: asyncio's (as tests/inproc.py) or uvloop's (as the daemon)."""
    if request.param == "uvloop":
        monkeypatch.setattr(asyncio, "new_event_loop", uvloop.new_event_loop)
    yield request.param


@pytest.mark.parametrize("first", [9000])
def test_bytes_pipelined_behind_a_streaming_body_are_bounded(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,  # noqa: F811
    loop_kind: str,
    first: int,
) -> None:
    """A client asks for a big blob, reads nothing, and keeps sending: what the guard holds
    for the requests behind the body must stay bounded (the transport's reading paused), as
    aiohttp's parser stays bounded. With more than FAST_HEAD_MAX bytes in the same segment as
    the GET, ``data_received`` never pauses reading (``was <= FAST_HEAD_MAX`` is never true)
    and ``held`` grows with all the client sends until ``write_timeout``."""
    d = start(app_factory, tls, {"http": {"write_timeout": "30s"}})
    ctx = tls[1]
    digest = put_blob(d, ctx, os.urandom(32 * 1024 * 1024))
    c = TLSConn(d, ctx, rcvbuf=64 * 1024)
    pushed = 0
    try:
        # the GET and ``first`` bytes more in one write (one TLS record, one TCP segment)
        c.send(request("GET", f"/v2/{REPO}/blobs/{digest}") + b"x" * first)
        c.sock.settimeout(0.5)
        junk = b"y" * 65536
        deadline = time.monotonic() + 8  # a bound on the test, not a figure
        while pushed < 256 * 1024 * 1024 and time.monotonic() < deadline:
            try:
                c.sock.sendall(junk)
            except TimeoutError:
                break  # the server stopped reading: bounded
            pushed += len(junk)
    finally:
        c.close()
    settled(d, digest)  # the body's end (its access line) once the loop saw the close
    assert metric(d, FAST) == 1  # the lane streamed it
    # the socket buffers of both ends (a few MiB on loopback), not the client's whole stream
    assert pushed < 32 * 1024 * 1024, f"server kept reading: {pushed} bytes held"


def test_a_half_closed_client_gets_the_whole_body(
    app_factory: Callable[..., AppDaemon], loop_kind: str
) -> None:
    """A plain-HTTP client that sends its request and shuts its side (SHUT_WR), then reads: the
    lane's body goes out whole, then the connection closes (it sent ~4.6 of 8 MiB, then FIN)."""
    d = start(app_factory, (None, None))
    data = os.urandom(8 * 1024 * 1024)
    digest = put_blob(d, None, data)
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(request("GET", f"/v2/{REPO}/blobs/{digest}"))
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while chunk := s.recv(1 << 20):  # bounded by the socket's timeout
            got += chunk
    finally:
        s.close()
    settled(d, digest)
    assert metric(d, FAST) == 1  # the lane streamed it
    assert bytes(got).partition(b"\r\n\r\n")[2] == data


def test_no_descriptor_leaks_after_many_bodies_cut(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,  # noqa: F811
    loop_kind: str,
) -> None:
    """40 bodies the client drops after a little: the daemon's descriptors come back."""
    d = start(app_factory, tls)
    ctx = tls[1]
    data = os.urandom(8 * 1024 * 1024)
    digest = put_blob(d, ctx, data)
    path = f"/v2/{REPO}/blobs/{digest}"
    c = TLSConn(d, ctx)
    c.send(request("GET", path))
    assert c.response()[2] == data
    c.close()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(40):
        c = TLSConn(d, ctx, rcvbuf=64 * 1024)
        c.send(request("GET", path))
        while len(c.buf) < 50_000:
            c._fill()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        c.sock.close()  # an RST mid-body
    lines = []
    for _ in range(500):  # a bound on the test, not a figure
        lines = [ln for ln in settled(d, digest) if "client_gone" in ln]
        if len(lines) == 40:
            break
        d.call(asyncio.sleep(0.02))
    assert len(lines) == 40, lines
    after = len(os.listdir("/proc/self/fd"))
    assert after <= before, (before, after)
    c = TLSConn(d, ctx)
    c.send(request("GET", path) + request("GET", path))
    assert c.response()[2] == data and c.response()[2] == data
    c.close()
    assert metric(d, FAST) >= 42


def test_big_pipelined_bodies_arrive_whole_and_in_order(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,  # noqa: F811
    loop_kind: str,
) -> None:
    """Bodies of the lane and aiohttp's, interleaved on one connection to a slow reader:
    each byte in its place (sendfile around the transport against the transport's buffer)."""
    d = start(app_factory, tls)
    ctx = tls[1]
    blobs = [os.urandom(BIG + i) for i in range(3)]
    paths = [f"/v2/{REPO}/blobs/{put_blob(d, ctx, b)}" for b in blobs]
    small = b"s" * 1000
    spath = f"/v2/{REPO}/blobs/{put_blob(d, ctx, small)}"
    c = TLSConn(d, ctx, rcvbuf=32 * 1024)
    try:
        reqs = b""
        want = []
        for i in range(12):
            k = i % 3
            extra = (CREDENTIALS,) if i % 4 == 1 else ()
            reqs += request("GET", paths[k], *extra) + request("GET", spath)
            want += [blobs[k], small]
        c.send(reqs)
        for w in want:
            time.sleep(0.002)
            status, _, body = c.response()
            assert status.endswith("200 OK") and body == w
    finally:
        c.close()
    assert metric(d, FAST) > 0


def test_sigterm_lets_an_inflight_tls_download_from_the_lane_finish(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    """test_process.test_sigterm_lets_inflight_download_finish over TLS (tls.workers: 0), whose
    blob bodies the lane streams since fde5db8: aiohttp sees the connection idle and closes it
    at once on a stop, cutting the download (82cd573's Streams drain fixes it, not on main)."""
    cert, key = self_signed(tmp_path, "server")
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    d = daemon_factory(
        {
            "shutdown_timeout": "20s",
            "tls": {"cert": str(cert), "key": str(key), "workers": "0"},
        }
    )
    data = os.urandom(64 * 1024 * 1024)
    digest = sha256(data)
    req = urllib.request.Request(
        f"{d.url}/v2/{REPO}/blobs/uploads/?digest={digest}", data=data, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60, context=ctx) as resp:
        assert resp.status == 201
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", d.port))
    sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    got = 0
    try:
        sock.sendall(request("GET", f"/v2/{REPO}/blobs/{digest}"))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, body = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        got = len(body)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60  # a bound on the test, not a figure
        slow_until = time.monotonic() + 1.5
        while got < len(data) and time.monotonic() < deadline:
            if time.monotonic() < slow_until:
                time.sleep(0.01)  # a slow reader while the stop begins
            try:
                block = sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError, ssl.SSLError):
                break
            if not block:
                break
            got += len(block)
    finally:
        sock.close()
    assert d.proc.wait(30) == 0
    assert got == len(data), f"cut at {got} of {len(data)} by the stop"


def test_a_body_longer_than_keepalive_timeout_on_a_fresh_connection_is_whole(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,  # noqa: F811
    loop_kind: str,
) -> None:
    """aiohttp arms its keep-alive timer in ``connection_made`` (aiohttp >= 3.10) and closes a
    connection whose handler it sees idle at ``keepalive_timeout``: on a connection whose first
    request the lane streams, that cut the body (``error=client_gone``) for a slow reader of a
    big layer at the default 75 s. Here keepalive_timeout is 0.5 s and the reader takes ~2 s."""
    d = start(app_factory, tls, {"http": {"keepalive_timeout": "0.5s"}})
    ctx = tls[1]
    data = os.urandom(8 * 1024 * 1024)
    digest = put_blob(d, ctx, data)
    c = TLSConn(d, ctx, rcvbuf=64 * 1024)
    got = bytearray()
    try:
        c.send(request("GET", f"/v2/{REPO}/blobs/{digest}"))
        deadline = time.monotonic() + 30  # a bound on the test, not a figure
        paced = 0
        while time.monotonic() < deadline:
            try:
                chunk = c.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            got += chunk
            if len(got) - paced >= 65536:  # ~4 MiB/s: a slow client
                paced = len(got)
                time.sleep(0.015)
            if len(bytes(got).partition(b"\r\n\r\n")[2]) >= len(data):
                break
    finally:
        c.close()
    lines = settled(d, digest)
    assert metric(d, FAST) == 1  # the lane streamed it
    assert bytes(got).partition(b"\r\n\r\n")[2] == data, (len(got), lines)


def test_a_stop_does_not_keep_answering_a_keepalive_client_from_the_lane(
    daemon_factory: Callable[..., Daemon],
) -> None:
    """A client that pulls blob after blob on one connection while the daemon stops: aiohttp
    closes a connection after the response in flight; the lane (82cd573's Streams drain)
    goes on starting bodies on it until ``shutdown_timeout``, then cuts the one in flight."""
    d = daemon_factory({"shutdown_timeout": "3s", "log": {"access": True}})
    data = os.urandom(4 * 1024 * 1024)
    digest = sha256(data)
    req = urllib.request.Request(
        f"{d.url}/v2/{REPO}/blobs/uploads/?digest={digest}", data=data, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 201
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    path = f"/v2/{REPO}/blobs/{digest}"
    whole = cut = 0
    buf = b""
    try:
        assert d.proc is not None
        for i in range(400):  # a bound on the test, not a figure
            s.sendall(request("GET", path))
            if i == 1:
                d.proc.send_signal(signal.SIGTERM)
            try:
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        raise ConnectionError
                    buf += chunk
                _, _, buf = buf.partition(b"\r\n\r\n")
                while len(buf) < len(data):
                    time.sleep(0.002)  # a reader a little slower than loopback
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        cut += 1
                        raise ConnectionError
                    buf += chunk
                buf = buf[len(data) :]
                whole += 1
            except (ConnectionError, TimeoutError):
                break
    finally:
        s.close()
    assert d.proc.wait(30) == 0
    assert cut == 0, f"a body cut by the stop after {whole} whole ones"
    assert whole <= 4, f"{whole} answers after the stop began"


def test_a_stop_gives_aiohttp_only_what_the_lane_bodies_left_of_shutdown_timeout(
    app_factory: Callable[..., AppDaemon],
) -> None:
    """One deadline for the whole stop: a body the lane streams to a client that takes nothing
    holds the stop until ``shutdown_timeout``, and aiohttp's handlers then get what is left of
    it (nothing), not a second ``shutdown_timeout`` (a stop took up to twice it): an upload
    that stalled in the middle of its body is cut then (aiohttp reads a timeout of 0 as none:
    given 0, it waited for the handler until ``http.read_timeout``)."""
    d = start(
        app_factory,
        (None, None),
        {"shutdown_timeout": "1s", "http": {"write_timeout": "60s", "read_timeout": "60s"}},
    )
    digest = put_blob(d, None, os.urandom(32 * 1024 * 1024))
    s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    up = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(request("GET", f"/v2/{REPO}/blobs/{digest}"))
        assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")  # and then it reads nothing
        # an upload whose client sends half its body and stalls: aiohttp's handler waits
        body = os.urandom(64 * 1024)
        head = (
            f"POST /v2/{REPO}/blobs/uploads/?digest={sha256(body)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        up.sendall(head.encode() + body[:1000])
        d.stop()  # (bounded: 60 s for the stop, then TimeoutError)
        got = up.recv(4096)  # the upload's connection is closed (bounded: its timeout)
        assert got == b"" or got.startswith(b"HTTP/1.1 "), got
    finally:
        s.close()
        up.close()
    log = d.log()
    assert "shutdown.start timeout=1s" in log
    # the lane's body (counted when it ends) used the whole deadline, its client taking
    # nothing: aiohttp is given none of it
    assert "shutdown.handlers bodies_cut=1 timeout=0.0s" in log, log[-2000:]
    assert metric(d, FAST) == 1
