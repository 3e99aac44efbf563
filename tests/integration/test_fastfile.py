"""Committed blob files streamed by the fast lane, over TLS on the event loop (regproxy.fastfile)
and over plain HTTP with sendfile (regproxy.fastsend), each test on both: the same bytes, headers, access lines and metrics as aiohttp's answer,
in order behind pipelined requests, bounded for a client that does not read, cut cleanly for one
that goes away, and left to aiohttp when the file is gone or credentials are needed.

In-process (tests/inproc.py serves through the daemon's own listener, ``tls.workers: 0``), a
client of the test's own on a raw socket where the framing matters.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from regproxy.oci import Digest
from regproxy.web_keys import METRICS_KEY, REGISTRY_KEY
from tests.certs import self_signed
from tests.images import sha256
from tests.inproc import AppDaemon
from tests.integration.test_fastpath import CREDENTIALS, REPO, Conn, request

BIG = 1024 * 1024 + 4321  # four chunks and a bit
FAST = "regproxy_http_fast_answers_total"
SERVED = "regproxy_served_bytes_total"
REQUESTS = "regproxy_http_requests_total"
CUT = "regproxy_http_slow_clients_cut_total"
PASSWORD = "fast-file-pw"


def https(
    d: AppDaemon,
    ctx: ssl.SSLContext | None,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    req = urllib.request.Request(d.url + path, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def metric(d: AppDaemon, name: str, **labels: str) -> float:
    return d.app[METRICS_KEY].registry.get_sample_value(name, labels) or 0.0


def settled(d: AppDaemon, digest: str) -> list[str]:
    """The blob's access lines once there is one (a body cut short logs when the loop sees it)."""
    for _ in range(500):  # a bound on the test, not a figure
        lines = access_lines(d, digest)
        if lines:
            return lines
        d.call(asyncio.sleep(0.02))
    raise AssertionError("no access line")


def fast_answers(d: AppDaemon, want: float) -> float:
    """The lane's answers once ``want`` are counted (a body is counted when it ends, on the
    app's loop: its client may hold the last byte before the loop got back from writing it)."""
    for _ in range(500):  # a bound on the test, not a figure
        if metric(d, FAST) >= want:
            break
        d.call(asyncio.sleep(0.01))
    return metric(d, FAST)


class TLSConn(Conn):
    """:class:`tests.integration.test_fastpath.Conn`, over TLS with ``ctx``."""

    def __init__(self, d: AppDaemon, ctx: ssl.SSLContext | None, rcvbuf: int = 0) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:  # before the connect: the window the client offers stays small
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(10)
        raw.connect(("127.0.0.1", d.port))
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
        self.buf = b""


TLS = tuple[dict[str, str] | None, ssl.SSLContext | None]


@pytest.fixture(params=["tls", "plain"])
def tls(tmp_path: Path, request: pytest.FixtureRequest) -> TLS:
    """(the daemon's ``tls`` section, the client's context), or (None, None): plain HTTP."""
    if request.param == "plain":
        return None, None
    cert, key = self_signed(tmp_path, "server")
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False  # the certificate names 127.0.0.1 in its subject only
    return {"cert": str(cert), "key": str(key), "workers": "0"}, ctx


def start(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,
    extra: dict[str, object] | None = None,
) -> AppDaemon:
    config: dict[str, object] = {"log": {"access": True}, **(extra or {})}
    if tls[0] is not None:
        config["tls"] = tls[0]
    return app_factory(config)


def put_blob(d: AppDaemon, ctx: ssl.SSLContext | None, data: bytes, auth: str = "") -> str:
    digest = sha256(data)
    headers = {"Authorization": auth} if auth else {}
    status, _ = https(d, ctx, "POST", f"/v2/{REPO}/blobs/uploads/?digest={digest}", data, headers)
    assert status == 201
    return digest


def access_lines(d: AppDaemon, digest: str) -> list[str]:
    return [
        re.sub(r"duration_ms=\S+ ", "", ln.split(" request ", 1)[1])
        for ln in d.log().splitlines()
        if " request method=" in ln and digest in ln and "method=POST" not in ln
    ]


def test_a_blob_file_over_tls_is_the_applications_answer(
    app_factory: Callable[..., AppDaemon], tls: TLS
) -> None:
    """GET from the lane and from aiohttp (credentials send it there; without users they
    change nothing): the same status, headers but Date, body, access line; HEAD, a range and a
    condition are aiohttp's; metrics count each once."""
    d = start(app_factory, tls)
    ctx = tls[1]
    data = os.urandom(BIG)
    digest = put_blob(d, ctx, data)
    path = f"/v2/{REPO}/blobs/{digest}"
    before = metric(d, FAST)
    served = metric(d, SERVED, kind="blob", source="disk")
    c = TLSConn(d, ctx)
    try:
        c.send(request("GET", path))
        fast = c.response()
        assert fast_answers(d, before + 1) == before + 1
        c.send(request("GET", path, CREDENTIALS))
        slow = c.response()
        fast[1].pop("date"), slow[1].pop("date")
        assert fast[0] == slow[0] == "HTTP/1.1 200 OK"
        assert fast[1] == slow[1] and fast[2] == slow[2] == data
        assert fast[1]["docker-content-digest"] == digest
        c.send(request("HEAD", path))
        status, head, _ = c.response(head_only=True)
        head.pop("date")
        assert status.endswith("200 OK") and head == fast[1]
        c.send(request("GET", path, "Range: bytes=10-19"))
        assert c.response()[2] == data[10:20]
        c.send(request("GET", path, f'If-None-Match: "{digest}"'))
        assert c.response(head_only=True)[0].endswith("304 Not Modified")
        assert metric(d, FAST) == before + 1
        c.send(request("GET", path))  # the lane again after aiohttp's answers
        assert c.response()[2] == data
    finally:
        c.close()
    assert fast_answers(d, before + 2) == before + 2
    # three whole bodies and ten bytes
    got = metric(d, SERVED, kind="blob", source="disk") - served
    assert got == 3 * BIG + 10
    lines = access_lines(d, digest)
    assert len(lines) == 6, lines
    assert lines[0] == lines[1] == lines[5]
    assert f"bytes={BIG}" in lines[0] and "cache=hit" in lines[0] and "error=-" in lines[0]
    requests = metric(d, REQUESTS, method="GET", route="blob", status="200")
    assert requests == 3


def test_pipelined_requests_behind_a_file_are_answered_in_order(
    app_factory: Callable[..., AppDaemon], tls: TLS
) -> None:
    """Files, a small blob, a range and a miss in one write: each answer in its place, the
    lane's and aiohttp's; then Connection: close after a file closes the connection."""
    d = start(app_factory, tls)
    ctx = tls[1]
    big, other, small = os.urandom(BIG), os.urandom(3 * BIG), b"small" * 100
    digests = [put_blob(d, ctx, x) for x in (big, other, small)]
    paths = [f"/v2/{REPO}/blobs/{x}" for x in digests]
    assert https(d, ctx, "GET", paths[2])[1] == small  # its bytes cached now
    c = TLSConn(d, ctx)
    try:
        c.send(
            request("GET", paths[0])
            + request("GET", paths[1])
            + request("GET", paths[2])
            + request("GET", paths[0], "Range: bytes=0-3")
            + request("GET", f"/v2/{REPO}/blobs/{sha256(b'nope')}")
            + request("GET", paths[1])
            + request("GET", paths[0], "Connection: close")
        )
        assert c.response()[2] == big
        assert c.response()[2] == other
        assert c.response()[2] == small
        assert c.response()[2] == big[:4]
        assert c.response()[0].endswith("404 Not Found")
        assert c.response()[2] == other
        status, headers, body = c.response()
        assert status.endswith("200 OK") and body == big and headers["connection"] == "close"
        assert c.sock.recv(1) == b""  # closed after it
    finally:
        c.close()


def test_a_reader_that_takes_nothing_is_bounded_then_cut(
    app_factory: Callable[..., AppDaemon], tls: TLS
) -> None:
    """A 32 MiB blob to a client that reads nothing: the lane stops writing when the transport
    is full (what it handed out stays a small part of the blob) and cuts the connection after
    ``http.write_timeout``, counted and logged as aiohttp's path does."""
    d = start(app_factory, tls, {"http": {"write_timeout": "0.5s"}})
    ctx = tls[1]
    data = os.urandom(32 * 1024 * 1024)
    digest = put_blob(d, ctx, data)
    cut = metric(d, CUT, phase="write")
    c = TLSConn(d, ctx, rcvbuf=64 * 1024)
    try:
        c.send(request("GET", f"/v2/{REPO}/blobs/{digest}"))  # and reads nothing
        lines = settled(d, digest)
    finally:
        c.close()
    assert len(lines) == 1 and "error=client_stalled" in lines[0], lines
    assert metric(d, FAST) == 1  # the lane's
    handed = int(re.search(r" bytes=(\d+) ", lines[0]).group(1))  # type: ignore[union-attr]
    print("handed", handed)
    assert handed < 8 * 1024 * 1024, handed  # the kernel's buffers and a chunk or two
    assert metric(d, CUT, phase="write") == cut + 1


def test_a_client_gone_mid_body_and_a_file_gone_before_the_open(
    app_factory: Callable[..., AppDaemon], tls: TLS
) -> None:
    """A client that reads a little and hangs up: one access line, ``error=client_gone``, the
    daemon serves on. A file removed behind the index's back (the lookup cached): the lane
    does not open it, aiohttp answers as for any lost blob (404 here: no upstream)."""
    d = start(app_factory, tls)
    ctx = tls[1]
    data = os.urandom(16 * 1024 * 1024)
    digest = put_blob(d, ctx, data)
    path = f"/v2/{REPO}/blobs/{digest}"
    c = TLSConn(d, ctx, rcvbuf=64 * 1024)
    try:
        c.send(request("GET", path))
        while len(c.buf) < 100_000:
            c._fill()
    finally:
        c.sock.close()
    lines = settled(d, digest)
    assert len(lines) == 1 and "error=client_gone" in lines[0], lines
    assert metric(d, FAST) == 1  # the lane's
    assert https(d, ctx, "GET", path)[1] == data  # and on

    fast = metric(d, FAST)
    store = d.app[REGISTRY_KEY].local.store
    store.blob_path(Digest.parse(digest)).unlink()
    status, body = https(d, ctx, "GET", path)
    assert status == 404 and b"BLOB_UNKNOWN" in body
    assert metric(d, FAST) == fast


def test_credentials_required_go_to_aiohttp(
    app_factory: Callable[..., AppDaemon],
    tls: TLS,
) -> None:
    """With anonymous pulls off, a blob GET is aiohttp's (401 without credentials, the blob
    with them), never the lane's."""
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    d = start(app_factory, tls, {"auth": {"users": {"alice": hashed}, "anonymous_pull": False}})
    ctx = tls[1]
    auth = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    data = os.urandom(BIG)
    digest = put_blob(d, ctx, data, auth)
    path = f"/v2/{REPO}/blobs/{digest}"
    assert https(d, ctx, "GET", path)[0] == 401
    assert https(d, ctx, "GET", path, headers={"Authorization": auth}) == (200, data)
    for _ in range(500):  # aiohttp counts it after the body went out: a bound, not a figure
        if metric(d, REQUESTS, method="GET", route="blob", status="200") == 1:
            break
        d.call(asyncio.sleep(0.02))
    assert metric(d, REQUESTS, method="GET", route="blob", status="200") == 1
    assert metric(d, FAST) == 0
