"""The fast lane against hostile and odd requests: whatever it answers must be, byte for byte,
what aiohttp answers with the lane off (regproxy.fastpath, regproxy.connections).

Two apps in-process on the same content, one with ``http.fast_path`` on and one with it off; each
case's raw bytes go to both on a fresh connection, and what comes back (all of it, up to the
close or a quiet moment) must be the same but for ``Date`` and the instance id.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from regproxy.web_keys import REGISTRY_KEY
from tests.images import OCI_MANIFEST, sha256
from tests.inproc import AppDaemon
from tests.integration.test_fastpath import REPO, fast_answers, manifest, push
from tests.peers import http

PATH = f"/v2/{REPO}/manifests/v1"
#: how long a connection may stay quiet before its answers are taken to be complete
QUIET = 0.4


def raw(*lines: str, path: str = PATH, method: str = "GET", host: bool = True) -> bytes:
    head = [f"{method} {path} HTTP/1.1", *(["Host: x"] if host else []), *lines, "", ""]
    return "\r\n".join(head).encode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AppDaemon, AppDaemon]]:
    """(lane on, lane off), each holding tag v1 of REPO, looked up once (so the lane has it)."""
    started: list[AppDaemon] = []
    try:
        for fast in (True, False):
            root = Path(tmp_path_factory.mktemp(f"hostile-{fast}"))
            d = AppDaemon(root, {"http": {"fast_path": fast}}).start()
            started.append(d)
            push(d, "v1")
            d.call(d.app[REGISTRY_KEY].confirm_lookups())
            assert http("GET", f"{d.url}{PATH}")[0] == 200
        yield started[0], started[1]
    finally:
        for d in started:
            d.stop()


def exchange(d: AppDaemon, data: bytes) -> bytes:
    """Everything the daemon answers to ``data`` on a new connection (then closed or quiet)."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
        s.sendall(data)
        s.settimeout(QUIET)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            got += b"<reset>"
    got = re.sub(rb"\r\nDate: [^\r]*", b"\r\nDate: -", got)
    return re.sub(rb"\r\nRegproxy-Instance: [0-9a-f]*", b"\r\nRegproxy-Instance: -", got)


#: requests aiohttp refuses (400) that a lane checking less would answer 200
REFUSED = {
    # aiohttp reads a header line of at most 8190 bytes (name and value)
    "a header value over aiohttp's line limit": raw("X-Long: " + "a" * 9000),
    "a header name over aiohttp's line limit": raw("X" * 8191 + ": a"),
    # HTTP/1.1 requires Host (RFC 9112 3.2); aiohttp refuses a request without one
    "no Host": raw(host=False),
    # aiohttp refuses the old WebSocket handshake's key outright
    "Sec-WebSocket-Key1": raw("Sec-WebSocket-Key1: x"),
    # aiohttp refuses a second one of some headers (its parser's SINGLETON_HEADERS)
    "two User-Agent": raw("User-Agent: a", "User-Agent: b"),
    "two Content-Type": raw("Content-Type: a", "content-type: b"),
    "two Max-Forwards": raw("Max-Forwards: 1", "Max-Forwards: 2"),
}
#: requests whose connection handling aiohttp (llhttp) takes from a header the lane must know
CONNECTION = {
    # llhttp reads Proxy-Connection as Connection: close, and refuses data after it
    "Proxy-Connection: close, then another request": raw("Proxy-Connection: close") + raw(),
    "Proxy-Connection: close": raw("Proxy-Connection: close"),
    # answered and closed, its headers in aiohttp's order (Connection after Server)
    "Connection: close": raw("Connection: close"),
    "HEAD, Connection: close": raw("Connection: close", method="HEAD"),
}


@pytest.mark.parametrize("case", [*REFUSED, *CONNECTION])
def test_the_lane_answers_odd_requests_as_aiohttp_does(
    pair: tuple[AppDaemon, AppDaemon], case: str
) -> None:
    data = {**REFUSED, **CONNECTION}[case]
    fast, slow = pair
    before = fast_answers(fast)
    with ThreadPoolExecutor(2) as pool:
        lane, plain = pool.map(exchange, (fast, slow), (data, data))
    assert lane == plain, (lane[:300], plain[:300])
    if case in REFUSED:
        assert plain.startswith(b"HTTP/1.0 400 ") or plain.startswith(b"HTTP/1.1 400 "), plain
        assert fast_answers(fast) == before


#: alice:pw (bcrypt, cost 4)
ALICE = "$2b$04$gnFH5kr/bNg1ynXbSQrbNO50MH7qgVKuBTAow7rplBO47U1OunoNu"
ALICE_LOGIN = {"Authorization": "Basic YWxpY2U6cHc="}


def test_the_lane_refuses_what_the_login_rules_refuse(
    app_factory: Callable[..., AppDaemon],
) -> None:
    """With users and anonymous pulls, a path with ``/blobs/uploads/`` in it needs a login
    (regproxy.auth), even when it routes to a manifest (a repository named ``.../blobs/uploads``):
    the lane must not answer it anonymously from memory."""
    d = app_factory({"auth": {"users": {"alice": ALICE}}})
    repo = "team/blobs/uploads"
    config = b'{"architecture":"amd64","os":"linux"}'
    url = f"{d.url}/v2/{repo}/blobs/uploads/?digest={sha256(config)}"
    assert http("POST", url, config, ALICE_LOGIN)[0] == 201
    body = manifest(config)
    headers = {**ALICE_LOGIN, "Content-Type": OCI_MANIFEST}
    assert http("PUT", f"{d.url}/v2/{repo}/manifests/v1", body, headers)[0] == 201
    d.call(d.app[REGISTRY_KEY].confirm_lookups())
    path = f"/v2/{repo}/manifests/v1"
    assert http("GET", d.url + path, headers=ALICE_LOGIN)[2] == body  # cached now
    got = exchange(d, raw(path=path) + raw(path=path, method="HEAD"))
    assert got.count(b"HTTP/1.1 401 Unauthorized\r\n") == 2, got[:300]
    assert b" 200 OK\r\n" not in got
