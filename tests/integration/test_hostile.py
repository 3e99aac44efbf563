"""Hostile clients against a real daemon: slow, stalled, half-sent, numerous, dropped, absurd.

Each test asserts the end state (the daemon answers, the slow client was cut, the log says so);
timeouts are config (``http.*: 1s``), never sleeps; every wait is bounded by a generous deadline
that only a failure reaches. Upstream-side hostility is in test_hostile_upstream.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import select
import socket
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection

import pytest

from tests.peers import Daemon, error_codes, http

BIG = 32 * 1024 * 1024  # what slow readers ask for
WARM = 5_000_000  # the probe: well above the 64 KiB served from memory, so it is a file
DEADLINE = 60.0  # only a failure waits this long
pytestmark = pytest.mark.process  # every test here talks to a daemon subprocess


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(d: Daemon, repo: str, data: bytes) -> str:
    digest = sha256(data)
    st, _, body = http("POST", f"{d.url}/v2/{repo}/blobs/uploads/?digest={digest}", data)
    assert st == 201, body
    return digest


def connect(d: Daemon, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:  # before connect: the window the server sees stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(DEADLINE)
    s.connect(("127.0.0.1", d.port))
    return s


def get_request(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def read_head(s: socket.socket) -> bytes:
    """Bytes up to and including the end of the response headers (and maybe some body)."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def until_closed(s: socket.socket) -> int:
    """Read until the server closes the connection; the bytes read (a reset counts as closed)."""
    n = 0
    s.settimeout(DEADLINE)
    try:
        while chunk := s.recv(1 << 20):
            n += len(chunk)
    except ConnectionResetError:
        pass
    return n


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {DEADLINE}s: {what}")
        time.sleep(0.05)


def access_lines(d: Daemon, fragment: str) -> list[str]:
    return [ln for ln in d.log().splitlines() if "regproxy.access" in ln and fragment in ln]


def assert_quiet(d: Daemon) -> None:
    """Nothing a client did shows as a crash in the daemon's log."""
    log = d.log()
    assert "Traceback" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
    assert "Too many open files" not in log, log[-3000:]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with the default limits (write_timeout 60 s: slow readers stay connected)."""
    d = Daemon(tmp_path_factory.mktemp("hostile"), {})
    try:
        d.start()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def blobs(plain: Daemon) -> dict[str, tuple[str, bytes]]:
    big, warm = os.urandom(BIG), os.urandom(WARM)
    return {"big": (push(plain, "slow", big), big), "warm": (push(plain, "warm", warm), warm)}


@pytest.fixture
def tight(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """A daemon whose every client deadline is 1 s."""
    return daemon_factory(
        {"http": {"header_timeout": "1s", "write_timeout": "1s", "read_timeout": "1s"}}
    )


# --- slow readers hold no thread and no slot ----------------------------------------------------
def test_a_warm_pull_is_served_while_100_slow_readers_are_connected(
    plain: Daemon, blobs: dict[str, tuple[str, bytes]]
) -> None:
    big, _ = blobs["big"]
    warm, _ = blobs["warm"]
    readers = []
    try:
        for _ in range(100):
            s = connect(plain, rcvbuf=4096)
            s.sendall(get_request(f"/v2/slow/blobs/{big}"))
            assert read_head(s).startswith(b"HTTP/1.1 200"), "a slow reader was not answered"
            readers.append(s)  # and then it reads nothing more
        st, h, body = http("GET", f"{plain.url}/v2/warm/blobs/{warm}", timeout=DEADLINE)
        assert st == 200 and sha256(body) == warm and h["Docker-Content-Digest"] == warm
        # the readers are still connected, their responses still waiting for them
        for s in readers:
            assert s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    finally:
        for s in readers:
            s.close()
    wait_for(lambda: len(access_lines(plain, f"/v2/slow/blobs/{big}")) == 100, "100 access lines")
    lines = access_lines(plain, f"/v2/slow/blobs/{big}")
    assert all("error=client_gone" in ln for ln in lines), [ln[-160:] for ln in lines][:5]
    # the probe went out of the file, and its line counts the body
    (line,) = access_lines(plain, f"/v2/warm/blobs/{warm}")
    assert f"bytes={WARM} " in line and "status=200" in line
    assert_quiet(plain)


def test_a_hang_up_mid_stream_is_one_info_line(
    plain: Daemon, blobs: dict[str, tuple[str, bytes]]
) -> None:
    big, _ = blobs["big"]
    st, _, _ = http("POST", f"{plain.url}/v2/hangup/blobs/uploads/?mount={big}&from=slow")
    assert st == 201
    s = connect(plain)
    s.sendall(get_request(f"/v2/hangup/blobs/{big}"))
    got = read_head(s)
    while len(got) < 256 * 1024:
        got += s.recv(65536)
    s.close()

    def lines_of_the_get() -> list[str]:  # not the mount's line, which is there already
        return [ln for ln in plain.log().splitlines() if "hangup" in ln and "uploads" not in ln]

    wait_for(lambda: bool(lines_of_the_get()), "the access line")
    lines = lines_of_the_get()
    assert len(lines) == 1, lines
    assert " INFO " in lines[0] and "error=client_gone" in lines[0]
    sent = int(re.search(r" bytes=(\d+) ", lines[0]).group(1))  # type: ignore[union-attr]
    assert 256 * 1024 <= sent < BIG
    assert_quiet(plain)


def test_access_lines_count_the_body_of_a_sendfile_response(
    plain: Daemon, blobs: dict[str, tuple[str, bytes]]
) -> None:
    warm, data = blobs["warm"]
    st, _, _ = http("POST", f"{plain.url}/v2/counted/blobs/uploads/?mount={warm}&from=warm")
    assert st == 201
    st, _, body = http("GET", f"{plain.url}/v2/counted/blobs/{warm}")
    assert st == 200 and body == data
    st, _, body = http(
        "GET", f"{plain.url}/v2/counted/blobs/{warm}", headers={"Range": "bytes=100-4195"}
    )
    assert st == 206 and body == data[100:4196]
    st, _, _ = http("HEAD", f"{plain.url}/v2/counted/blobs/{warm}")
    assert st == 200
    wait_for(lambda: len(access_lines(plain, "/v2/counted/blobs/sha")) == 3, "3 access lines")
    full, ranged, head = access_lines(plain, "/v2/counted/blobs/sha")
    assert f"bytes={WARM} " in full
    assert "status=206 bytes=4096 " in ranged
    assert "method=HEAD" in head and " bytes=0 " in head


def test_absurd_numbers_are_spec_answers_never_500(
    plain: Daemon, blobs: dict[str, tuple[str, bytes]]
) -> None:
    warm, _ = blobs["warm"]
    huge = "9" * 5000
    url = f"{plain.url}/v2/warm/blobs/{warm}"
    for rng in (f"bytes={huge}-", f"bytes=0-{huge}", f"bytes=-{huge}"):
        st, h, body = http("GET", url, headers={"Range": rng})
        assert st == 416, (rng[:20], st, body[:200])  # beyond int64, as distribution answers
        assert h["Content-Range"] == f"bytes */{WARM}"
    # a header past 8 KiB is refused by the HTTP parser itself, before any handler
    st, _, _ = http("GET", url, headers={"Range": f"bytes={huge}-{huge}"})
    assert st == 400
    for n in (huge, "%C2%B2"):  # a superscript two: str.isdigit() says yes, int() says no
        st, _, body = http("GET", f"{plain.url}/v2/_catalog?n={n}")
        assert (st, error_codes(body)) == (400, ["PAGINATION_NUMBER_INVALID"])
    st, _, body = http("GET", f"{plain.url}/v2/warm/tags/list?n=%D9%A3")  # an Arabic-Indic 3
    assert st == 400
    st, h, _ = http("POST", f"{plain.url}/v2/absurd/blobs/uploads/")
    assert st == 202
    st, _, body = http(
        "PATCH",
        plain.url + h["Location"],
        b"x",
        {"Content-Range": f"0-{huge}", "Content-Type": "application/octet-stream"},
    )
    assert (st, error_codes(body)) == (400, ["BLOB_UPLOAD_INVALID"])
    assert_quiet(plain)


# --- deadlines: a client that stops is cut ------------------------------------------------------
def test_a_stalled_reader_is_dropped_after_write_timeout(tight: Daemon) -> None:
    big = push(tight, "stall", os.urandom(BIG))
    s = connect(tight, rcvbuf=4096)
    s.sendall(get_request(f"/v2/stall/blobs/{big}"))
    assert read_head(s).startswith(b"HTTP/1.1 200")
    # it takes nothing now; the daemon drops it after write_timeout (1 s)
    wait_for(lambda: bool(access_lines(tight, f"/v2/stall/blobs/{big}")), "the stall cut")
    (line,) = access_lines(tight, f"/v2/stall/blobs/{big}")
    assert "error=client_stalled" in line
    assert until_closed(s) < BIG  # what the kernel held, then the end: never the whole blob
    s.close()
    assert_quiet(tight)


def test_readers_of_answers_from_memory_that_take_nothing_are_cut(tight: Daemon) -> None:
    """A 3 MiB manifest and pipelined small blobs are one write each into the connection's
    buffer (no sendfile, no per-chunk deadline): a client that never reads them is cut after
    write_timeout too, instead of holding its connection and the bytes for ever."""
    config = push(tight, "mem", b"{}")
    small = os.urandom(60_000)
    small_digest = push(tight, "mem", small)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config,
                "size": 2,
            },
            "layers": [],
            "annotations": {"pad": "x" * (3 * 1024 * 1024)},
        }
    ).encode()
    st, _, body = http(
        "PUT",
        f"{tight.url}/v2/mem/manifests/big",
        manifest,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert st == 201, body
    accept = "Accept: application/vnd.oci.image.manifest.v1+json\r\n"
    readers = [connect(tight, rcvbuf=4096) for _ in range(6)]
    for s in readers:
        s.sendall(get_request("/v2/mem/manifests/big", accept))
    pipelined = connect(tight, rcvbuf=4096)
    pipelined.sendall(get_request(f"/v2/mem/blobs/{small_digest}") * 200)
    wait_for(
        lambda: tight.log().count("connection.write_stalled") >= 7, "the seven stalled readers cut"
    )
    for s in readers:
        assert until_closed(s) < len(manifest)  # what the kernel held, then the end
        s.close()
    assert until_closed(pipelined) < 200 * len(small)
    pipelined.close()
    st, _, body = http("GET", f"{tight.url}/metrics")
    cut = re.search(rb'regproxy_http_slow_clients_cut_total\{phase="write"\} (\S+)', body)
    assert cut is not None and float(cut.group(1)) >= 7
    st, _, got = http("GET", f"{tight.url}/v2/mem/manifests/big", headers={"Accept": accept[8:-2]})
    assert st == 200 and got == manifest  # a client that reads still gets it whole
    assert_quiet(tight)


def test_half_sent_headers_are_cut_after_header_timeout(tight: Daemon) -> None:
    socks = [connect(tight) for _ in range(20)]
    for s in socks[:10]:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # no empty line: the headers never end
    for s in socks[10:15]:  # empty lines before the request line do not stop the clock
        s.sendall(b"\r\n\r\n\n\nGET /v2/ HTTP/1.1\r\n")
    # the other five send nothing at all
    for s in socks:
        assert until_closed(s) == 0  # closed by the daemon, with no answer
        s.close()
    st, _, _ = http("GET", f"{tight.url}/v2/")
    assert st == 200
    st, _, body = http("GET", f"{tight.url}/metrics")
    cut = re.search(rb'regproxy_http_slow_clients_cut_total\{phase="header"\} (\S+)', body)
    assert cut is not None and float(cut.group(1)) >= 20
    assert_quiet(tight)


def test_a_stalled_upload_body_is_408_and_the_session_goes_on(tight: Daemon) -> None:
    st, h, _ = http("POST", f"{tight.url}/v2/drip/blobs/uploads/")
    assert st == 202
    location = h["Location"]
    st, _, _ = http("PATCH", tight.url + location, b"a" * 100, {"Content-Range": "0-99"})
    assert st == 202
    s = connect(tight)
    s.sendall(
        f"PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Range: 100-1099\r\n"
        "Content-Length: 1000\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        + b"b" * 10
    )  # and not one byte more
    head = read_head(s)
    assert head.startswith(b"HTTP/1.1 408"), head[:200]
    assert until_closed(s) >= 0
    s.close()
    st, h, _ = http("GET", tight.url + location)
    assert (st, h["Range"]) == (204, "0-99")  # the failed chunk was undone
    data = b"a" * 100 + b"c" * 50
    st, _, _ = http("PATCH", tight.url + location, b"c" * 50, {"Content-Range": "100-149"})
    assert st == 202
    st, _, _ = http("PUT", f"{tight.url}{location}?digest={sha256(data)}")
    assert st == 201
    st, _, body = http("GET", f"{tight.url}/v2/drip/blobs/{sha256(data)}")
    assert body == data


def test_stalled_form_and_bundle_bodies_are_408(tight: Daemon) -> None:
    """Every body has the read deadline, not only the OCI API's: the login form (anonymous),
    a bundle POSTed to /admin/import (the web page's upload form reads through the same)."""
    for path, ctype, sent in (
        ("/ui/login", "application/x-www-form-urlencoded", b"username=a&pass"),
        ("/admin/import", "application/x-tar", b"x" * 1000),
    ):
        s = connect(tight)
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            "Content-Length: 10000\r\n\r\n".encode()  # within a form's 16 KiB
            + sent
        )  # and not one byte more
        head = read_head(s)
        assert head.startswith(b"HTTP/1.1 408"), (path, sent[:40], head[:200])
        assert until_closed(s) >= 0
        s.close()
    st, _, _ = http("GET", f"{tight.url}/v2/")
    assert st == 200
    assert_quiet(tight)


# --- numbers: connections and sessions are capped ---------------------------------------------------
def test_connections_above_max_connections_get_503_and_retry_after(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory({"http": {"max_connections": 5}})
    held = [connect(d) for _ in range(5)]
    try:
        for s in held:  # each is admitted: it gets an answer on its connection
            s.sendall(get_request("/v2/"))
            assert read_head(s).startswith(b"HTTP/1.1 200")
        extra = connect(d)
        extra.sendall(get_request("/v2/"))
        answer = read_head(extra)
        extra.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"\r\nRetry-After: 1\r\n" in head
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        for s in held:
            s.close()
    # the slots free up as the held connections close
    wait_for(lambda: http("GET", f"{d.url}/v2/")[0] == 200, "a new connection admitted")
    assert_quiet(d)


def test_512_descriptors_survive_1000_half_sent_requests_and_1000_abandoned_uploads(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory({"http": {"header_timeout": "1s"}}, nofile=512)
    assert re.search(r"limits nofile=512 max_connections=\d+ ", d.log()), d.log()[-2000:]
    warm = os.urandom(WARM)
    digest = push(d, "survivor", warm)
    # 1000 connections that never finish their headers: admitted ones are cut after 1 s, the
    # rest are shed with 503; every one is closed by the daemon, none is left to exhaust it
    socks = []
    for _ in range(1000):
        s = connect(d)
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Half: ")
        socks.append(s)
    shed = 0
    pending = {s.fileno(): s for s in socks}
    deadline = time.monotonic() + DEADLINE
    while pending and time.monotonic() < deadline:
        ready, _, _ = select.select(list(pending), [], [], 1.0)
        for fd in ready:
            s = pending[fd]
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                shed += 1
            if not data or data.startswith(b"HTTP/1.1 503"):
                del pending[fd]
    assert not pending, f"{len(pending)} half-sent connections still open after {DEADLINE}s"
    for s in socks:
        s.close()
    assert 0 < shed < 1000  # some were admitted (then cut), the rest shed
    # 1000 upload sessions that are never used again (uploads.max_sessions: 1000)
    conn = HTTPConnection("127.0.0.1", d.port, timeout=DEADLINE)
    try:
        for _ in range(1000):
            conn.request("POST", "/v2/abandoned/blobs/uploads/")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202
        conn.request("POST", "/v2/abandoned/blobs/uploads/")
        resp = conn.getresponse()
        over = resp.read()
        assert (resp.status, error_codes(over)) == (429, ["TOOMANYREQUESTS"])
    finally:
        conn.close()
    assert d.proc is not None
    fds = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    assert fds < 100, f"{fds} descriptors open with 1000 idle upload sessions"
    st, _, body = http("GET", f"{d.url}/v2/survivor/blobs/{digest}", timeout=DEADLINE)
    assert st == 200 and body == warm
    st, _, body = http("GET", f"{d.url}/readyz")
    assert st == 200, body
    assert_quiet(d)


def test_shipped_defaults_are_logged_at_start(plain: Daemon) -> None:
    line = next(ln for ln in plain.log().splitlines() if " limits nofile=" in ln)
    nofile = int(re.search(r"nofile=(\d+)", line).group(1))  # type: ignore[union-attr]
    assert nofile == resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # raised to the hard limit
    assert "header_timeout=10s keepalive_timeout=75s write_timeout=60s read_timeout=60s" in line
    assert "max_upload_sessions=1000" in line
    # what start-up made is frozen out of the garbage collector's scans (regproxy.app.serve)
    frozen = re.search(r"startup\.gc_frozen objects=(\d+)", plain.log())
    assert frozen is not None and int(frozen.group(1)) > 10_000, plain.log()[-2000:]
    # glibc's malloc arenas capped (regproxy.malloc_arenas), unless the environment set them
    arenas = "unchanged" if os.environ.get("MALLOC_ARENA_MAX") else "2"
    assert f"startup.malloc_arenas max={arenas}" in plain.log(), plain.log()[-2000:]
