"""The fast lane (regproxy.fastpath, http.fast_path): cached manifest GETs answered in front of
aiohttp's parser must be the application's answers, in order, and never stale.

In-process (tests/inproc.py serves through the daemon's own listener); raw sockets where the
framing matters (pipelining, keep-alive), urllib elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.index import Index
from regproxy.lookups import TAG_CACHE_SECONDS
from regproxy.web_keys import REGISTRY_KEY, RESOLVER_KEY
from tests.fakes import FakeUpstream
from tests.images import OCI_CONFIG, OCI_MANIFEST, sha256
from tests.inproc import AppDaemon, FakeTime
from tests.peers import http

REPO = "fast/app"
#: the lane leaves requests with credentials to aiohttp (auth.py); without users they are ignored
CREDENTIALS = "Authorization: Basic eDp5"


def manifest(config: bytes, note: str = "") -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [],
    }
    if note:
        doc["annotations"] = {"note": note}
    return json.dumps(doc).encode()


def push(d: AppDaemon, ref: str, note: str = "", repo: str = REPO) -> tuple[str, bytes]:
    config = b'{"architecture":"amd64","os":"linux"}'
    status, _, _ = http("POST", f"{d.url}/v2/{repo}/blobs/uploads/?digest={sha256(config)}", config)
    assert status == 201
    body = manifest(config, note)
    url = f"{d.url}/v2/{repo}/manifests/{ref}"
    status, _, _ = http("PUT", url, body, {"Content-Type": OCI_MANIFEST})
    assert status == 201
    return sha256(body), body


def fast_answers(d: AppDaemon) -> float:
    _, _, text = http("GET", f"{d.url}/metrics")
    for line in text.decode().splitlines():
        if line.startswith("regproxy_http_fast_answers_total "):
            return float(line.split()[1])
    raise AssertionError("no regproxy_http_fast_answers_total")


def request(method: str, path: str, *extra: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()


class Conn:
    """One keep-alive connection, reading responses as a client does (Content-Length framed)."""

    def __init__(self, d: AppDaemon) -> None:
        self.sock = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        self.buf += chunk

    def response(self, head_only: bool = False) -> tuple[str, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return lines[0], headers, body

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def daemon(app_factory: Callable[..., AppDaemon]) -> AppDaemon:
    return app_factory({"log": {"access": True}})


def test_fast_answers_are_the_applications_answers(daemon: AppDaemon) -> None:
    """The same request answered by the lane and by aiohttp (credentials send it there; with
    no users configured they change nothing): the same status, headers (but Date) and body,
    for GET and HEAD, tag and digest, counted and logged alike; on one connection, which the
    lane takes again after each request aiohttp answered."""
    digest, body = push(daemon, "v1")
    # the tag's confirmations (twice a second) vouch for tags read after they started
    daemon.call(daemon.app[REGISTRY_KEY].confirm_lookups())
    c = Conn(daemon)
    try:
        for ref in ("v1", digest):  # the first look-ups read the index: aiohttp answers them
            c.send(request("GET", f"/v2/{REPO}/manifests/{ref}", CREDENTIALS))
            assert c.response()[2] == body
        for ref in ("v1", digest):
            for method in ("GET", "HEAD"):
                path = f"/v2/{REPO}/manifests/{ref}"
                before = fast_answers(daemon)
                keep = "Connection: keep-alive" if ref == digest else "User-Agent: x"
                c.send(request(method, path, f"Accept: {OCI_MANIFEST}", keep))
                fast = c.response(head_only=method == "HEAD")
                assert fast_answers(daemon) == before + 1
                c.send(request(method, path, f"Accept: {OCI_MANIFEST}", keep, CREDENTIALS))
                slow = c.response(head_only=method == "HEAD")
                assert fast_answers(daemon) == before + 1  # that one went to aiohttp
                assert fast[0] == slow[0] == "HTTP/1.1 200 OK"
                fast[1].pop("date"), slow[1].pop("date")
                assert fast[1] == slow[1]
                assert fast[1]["docker-content-digest"] == digest
                assert fast[1]["content-length"] == str(len(body))
                assert fast[2] == slow[2] == (body if method == "GET" else b"")
    finally:
        c.close()
    # the access lines of each fast/slow pair are the same but for the duration
    lines = [
        re.sub(r"duration_ms=\S+ ", "", ln.split(" request ", 1)[1])
        for ln in daemon.log().splitlines()
        if " request method=" in ln and "/manifests/" in ln and "method=PUT" not in ln
    ]
    lines = lines[2:]  # after the two warming ones
    assert len(lines) == 8
    assert all(lines[i] == lines[i + 1] for i in range(0, 8, 2)), lines
    assert "status=200" in lines[0] and f"bytes={len(body)}" in lines[0] and "cache=hit" in lines[0]
    _, _, text = http("GET", f"{daemon.url}/metrics")
    metrics = text.decode()
    for want in (
        'regproxy_http_requests_total{method="GET",route="manifest",status="200"} 6.0',
        'regproxy_http_requests_total{method="HEAD",route="manifest",status="200"} 4.0',
        'regproxy_cache_requests_total{kind="manifest",result="hit",upstream="local"} 10.0',
        'regproxy_served_bytes_total{kind="manifest",source="disk"} %.1f' % (6 * len(body)),
    ):
        assert want in metrics, want


def test_pipelined_requests_are_answered_in_order(daemon: AppDaemon) -> None:
    """Fast and slow requests in one write: each answer in its place; after the first request
    the lane declines (a blob), aiohttp answers the rest of the connection."""
    digest, body = push(daemon, "v1")
    _, other = push(daemon, "v2", note="two")
    config = b'{"architecture":"amd64","os":"linux"}'
    c = Conn(daemon)
    try:
        c.send(
            request("GET", f"/v2/{REPO}/manifests/v1")
            + request("HEAD", f"/v2/{REPO}/manifests/{digest}")
            + request("GET", f"/v2/{REPO}/manifests/v2")
            + request("GET", f"/v2/{REPO}/blobs/{sha256(config)}")
            + request("GET", f"/v2/{REPO}/manifests/v1")
            + request("GET", f"/v2/{REPO}/manifests/nope")
        )
        assert c.response()[2] == body
        status, headers, _ = c.response(head_only=True)
        assert status.endswith("200 OK") and headers["docker-content-digest"] == digest
        assert c.response()[2] == other
        assert c.response()[2] == config
        assert c.response()[2] == body
        status, _, err = c.response()
        assert status.endswith("404 Not Found") and b"MANIFEST_UNKNOWN" in err
        c.send(request("GET", f"/v2/{REPO}/manifests/v1"))  # kept alive, still answered
        assert c.response()[2] == body
    finally:
        c.close()


def test_a_head_split_over_writes_and_declined_requests(daemon: AppDaemon) -> None:
    """A head that arrives in pieces is answered once whole; what the lane declines (a bad
    reference, a malformed head, credentials) gets aiohttp's answer."""
    _, body = push(daemon, "v1")
    whole = request("GET", f"/v2/{REPO}/manifests/v1")
    c = Conn(daemon)
    try:
        for piece in (whole[:2], whole[2:11], whole[11:-1], whole[-1:]):
            c.send(piece)
        assert c.response()[2] == body
    finally:
        c.close()
    for raw, want in (
        (request("GET", f"/v2/{REPO}/manifests/-bad"), "404"),
        (request("GET", f"/v2/{REPO}/manifests/v1?n=1"), "200"),
        (request("GET", f"/v2/{REPO}/manifests/v1").replace(b"\r\n", b"\n"), "400"),
        (request("GET", f"/v2/{REPO}/manifests/v1", CREDENTIALS), "200"),
        (request("GET", f"/v2/{REPO}/manifests/v1", "Bad Header: x"), "400"),
        (request("GET", f"/v2/{REPO}/manifests/v1", "Connection: upgrade"), "200"),
        # no body to wait for: the answer itself, no 100 first (regproxy.expect)
        (request("GET", f"/v2/{REPO}/manifests/v1", "Expect: 100-continue"), "200"),
    ):
        c = Conn(daemon)
        try:
            before = fast_answers(daemon)
            c.send(raw)
            status, _, _ = c.response()
            assert status.split()[1] == want, raw
            assert fast_answers(daemon) == before
        finally:
            c.close()


def test_a_tag_moved_or_deleted_is_never_answered_stale(daemon: AppDaemon) -> None:
    """The lane answers from the lookup cache, which every change forgets exactly."""
    c = Conn(daemon)
    try:
        for round_ in range(2):
            d1, b1 = push(daemon, "v1", note=f"one{round_}")
            c.send(request("GET", f"/v2/{REPO}/manifests/v1"))
            assert c.response()[2] == b1
            c.send(request("GET", f"/v2/{REPO}/manifests/v1"))
            assert c.response()[2] == b1  # cached: the lane's
            d2, b2 = push(daemon, "v1", note=f"two{round_}")  # re-pushed: the tag moves
            c.send(request("GET", f"/v2/{REPO}/manifests/v1"))
            assert c.response()[2] == b2
            status, _, _ = http("DELETE", f"{daemon.url}/v2/{REPO}/manifests/v1")
            assert status == 202
            c.send(request("GET", f"/v2/{REPO}/manifests/v1"))
            status, _, _ = c.response()
            assert status.endswith("404 Not Found")
            status, _, _ = http("DELETE", f"{daemon.url}/v2/{REPO}/manifests/{d2}")
            assert status == 202
            c.send(request("GET", f"/v2/{REPO}/manifests/{d2}"))
            status, _, _ = c.response()
            assert status.endswith("404 Not Found")
            assert d1 != d2
    finally:
        c.close()


def test_a_tag_moved_by_another_process_is_dropped_at_the_next_confirmation(
    daemon: AppDaemon,
) -> None:
    """Tags stay believed while the index's data_version does not move; a change from another
    connection (a second Index on the same file, as ``regproxy import`` would open) drops them
    at the next confirmation."""
    d1, b1 = push(daemon, "v1")
    d2, _ = push(daemon, "v2", note="two")
    registry = daemon.app[REGISTRY_KEY]
    canonical = daemon.app[RESOLVER_KEY].resolve(REPO).canonical
    daemon.call(registry.confirm_lookups())  # (again:) the confirmations start here
    registry.cache.forget(tags=[(canonical, "v1")])
    assert http("GET", f"{daemon.url}/v2/{REPO}/manifests/v1")[2] == b1  # read, cached
    daemon.call(registry.confirm_lookups())  # unchanged: believed on
    far = time.monotonic() + TAG_CACHE_SECONDS * 0.9
    assert registry.cache.tag(canonical, "v1", far) is not None
    other = Index(daemon.root / "store" / "index.db")
    other.open()
    try:
        with other.db:
            other.db.execute("UPDATE tags SET digest=? WHERE repo=? AND tag='v1'", (d2, canonical))
    finally:
        other.close()
    daemon.call(registry.confirm_lookups())
    assert registry.cache.tag(canonical, "v1", time.monotonic()) is None
    status, headers, _ = http("GET", f"{daemon.url}/v2/{REPO}/manifests/v1")
    assert status == 200 and headers["Docker-Content-Digest"] == d2 != d1


def test_a_manifest_removed_by_another_process_is_not_served_from_memory(
    daemon: AppDaemon,
) -> None:
    """A manifest read by digest is cached; another process removes it from the index (as
    ``fsck --repair`` or ``gc`` would): at the next confirmation it is forgotten, and the
    digest is unknown on both paths."""
    d1, b1 = push(daemon, "gone")
    registry = daemon.app[REGISTRY_KEY]
    canonical = daemon.app[RESOLVER_KEY].resolve(REPO).canonical
    daemon.call(registry.confirm_lookups())
    url = f"{daemon.url}/v2/{REPO}/manifests/{d1}"
    assert http("GET", url)[2] == b1  # read, cached
    other = Index(daemon.root / "store" / "index.db")
    other.open()
    try:
        with other.db:
            other.db.execute("DELETE FROM tags WHERE repo=? AND digest=?", (canonical, d1))
            other.db.execute(
                "DELETE FROM repo_manifests WHERE repo=? AND digest=?", (canonical, d1)
            )
    finally:
        other.close()
    daemon.call(registry.confirm_lookups())
    assert http("GET", url)[0] == 404
    assert http("HEAD", url)[0] == 404


async def test_a_tag_past_tag_ttl_is_checked_upstream_not_answered_from_memory() -> None:
    """A pulled tag: answered from memory within tag_ttl; once past it (the injected clock),
    the lane declines and the application asks the upstream, which moved the tag."""
    up = await FakeUpstream().start()
    clock = FakeTime()
    proxy: AppDaemon | None = None
    try:
        config = b'{"architecture":"amd64","os":"linux"}'
        up.add_blob(config)
        v1 = manifest(config)
        up.add_manifest("app", "latest", v1, OCI_MANIFEST)
        cfg = {"upstreams": {up.hostport: {"url": up.url, "alias": "fake.test"}}, "tag_ttl": "60s"}
        proxy = AppDaemon(Path(tempfile.mkdtemp(prefix="fastpath-")), cfg, timing=clock.timing)
        await asyncio.to_thread(proxy.start)
        url = f"{proxy.url}/v2/fake.test/app/manifests/latest"
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(url) as r:
                    assert await r.read() == v1
            assert up.count("GET", "/manifests/latest") == 1
            assert up.count("HEAD", "/manifests/latest") == 0
            assert await asyncio.to_thread(fast_answers, proxy) >= 1
            v2 = manifest(config, note="moved")
            up.add_manifest("app", "latest", v2, OCI_MANIFEST)
            async with s.get(url) as r:
                assert await r.read() == v1  # within tag_ttl: what this host holds
            clock.advance(61)
            async with s.get(url) as r:
                assert await r.read() == v2
            assert up.count("HEAD", "/manifests/latest") == 1
    finally:
        if proxy is not None:
            await asyncio.to_thread(proxy.stop)
        await up.stop()


def test_a_connection_only_the_lane_answered_is_closed_after_keepalive_timeout(
    app_factory: Callable[..., AppDaemon],
) -> None:
    """aiohttp's keep-alive, kept by the guard for a connection aiohttp never answered: closed
    ``keepalive_timeout`` after its last answer, idle or with a head half-sent."""
    d = app_factory({"http": {"keepalive_timeout": "1s"}})
    digest, body = push(d, "v1")
    path = f"/v2/{REPO}/manifests/{digest}"  # a digest: cached for good, whatever the clock
    assert http("GET", d.url + path)[2] == body  # cached now
    for half in (b"", f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode()):
        c = Conn(d)
        try:
            before = fast_answers(d)
            c.send(request("GET", path))
            assert c.response()[2] == body
            assert fast_answers(d) == before + 1
            c.send(half)
            c.sock.settimeout(10)
            assert c.sock.recv(1) == b""  # closed by the daemon, nothing more said
        finally:
            c.close()


def test_connection_close_is_answered_then_closed_as_aiohttp_does(daemon: AppDaemon) -> None:
    """``Connection: close`` (skopeo sends it): the same answer as aiohttp's, with its
    ``Connection: close``, and the connection closed after it. More bytes after such a
    request go to aiohttp with it (its parser refuses them: 400)."""
    digest, body = push(daemon, "v1")
    path = f"/v2/{REPO}/manifests/{digest}"
    assert http("GET", daemon.url + path)[2] == body  # cached now
    answers = []
    for extra in ((), (CREDENTIALS,)):  # the lane's, then aiohttp's
        for followed in (False, True):
            c = Conn(daemon)
            try:
                before = fast_answers(daemon)
                raw = request("GET", path, "Connection: close", *extra)
                c.send(raw + request("GET", path) if followed else raw)
                status, headers, got = c.response()
                c.sock.settimeout(10)
                assert c.sock.recv(1) == b""  # closed, with nothing more
                lane = not extra and not followed
                assert fast_answers(daemon) == before + (1 if lane else 0)
                if followed:
                    assert status.split()[1] == "400"
                    continue
                assert got == body and status == "HTTP/1.1 200 OK"
                headers.pop("date")
                answers.append(headers)
            finally:
                c.close()
    assert answers[0] == answers[1] and answers[0]["connection"] == "close"


def test_small_blob_gets_are_the_applications_answers(daemon: AppDaemon) -> None:
    """A small blob GET: the lane's answer is aiohttp's; a range, a condition and a HEAD are
    aiohttp's, on the same connection (a blob over 64 KiB is sent from its file by the lane
    too: tests/integration/test_fastfile.py)."""
    small, big = b"s" * 5000, b"b" * 70_000
    for data in (small, big):
        url = f"{daemon.url}/v2/{REPO}/blobs/uploads/?digest={sha256(data)}"
        assert http("POST", url, data)[0] == 201
    path = f"/v2/{REPO}/blobs/{sha256(small)}"
    assert http("GET", daemon.url + path)[2] == small  # its bytes are cached now
    c = Conn(daemon)
    try:
        before = fast_answers(daemon)
        c.send(request("GET", path))
        fast = c.response()
        assert fast_answers(daemon) == before + 1
        c.send(request("GET", path, CREDENTIALS))
        slow = c.response()
        fast[1].pop("date"), slow[1].pop("date")
        assert fast[:2] == slow[:2] and fast[2] == slow[2] == small
        assert fast[1]["etag"] == f'"{sha256(small)}"'
        before = fast_answers(daemon)
        c.send(request("GET", path, "Range: bytes=0-9"))
        status, _, got = c.response()
        assert status.endswith("206 Partial Content") and got == small[:10]
        c.send(request("GET", path, f'If-None-Match: "{sha256(small)}"'))
        assert c.response(head_only=True)[0].endswith("304 Not Modified")
        c.send(request("HEAD", path))
        status, headers, _ = c.response(head_only=True)
        assert status.endswith("200 OK") and headers["content-length"] == str(len(small))
        c.send(request("GET", f"/v2/{REPO}/blobs/{sha256(big)}", CREDENTIALS))
        assert c.response()[2] == big
        assert fast_answers(daemon) == before  # all of them aiohttp's
        c.send(request("GET", path))
        assert c.response()[2] == small
        assert fast_answers(daemon) == before + 1  # and the lane again
    finally:
        c.close()
    _, _, text = http("GET", f"{daemon.url}/metrics")
    metrics = text.decode()
    assert 'regproxy_http_requests_total{method="GET",route="blob",status="200"}' in metrics
    lines = [
        re.sub(r"duration_ms=\S+ ", "", ln.split(" request ", 1)[1])
        for ln in daemon.log().splitlines()
        if " request method=GET" in ln and sha256(small) in ln
    ]
    assert lines[1] == lines[2] and "cache=hit" in lines[1] and f"bytes={len(small)}" in lines[1]
