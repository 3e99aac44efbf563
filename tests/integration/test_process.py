"""The daemon as a process: SIGKILL mid-upload, SIGTERM mid-download, config errors, non-root."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest

from tests.peers import REPO_ROOT, Daemon, free_port, http, stop_process, wait_http

pytestmark = pytest.mark.process  # every test here starts a process

MiB = 1 << 20
REPO = "spectro-images/crash/app"
_BLOCK = os.urandom(MiB)


def _chunk(i: int) -> bytes:
    """Chunk i of a big blob: 1 MiB, different from every other chunk, cheap to make."""
    return i.to_bytes(8, "big") + _BLOCK[8:]


def _chunks(n: int) -> Iterator[bytes]:
    for i in range(n):
        yield _chunk(i)


def _digest_of(n: int) -> str:
    h = hashlib.sha256()
    for c in _chunks(n):
        h.update(c)
    return "sha256:" + h.hexdigest()


def _request_head(method: str, daemon: Daemon, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {daemon.hostport}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _start_upload(daemon: Daemon) -> str:
    status, headers, _ = http("POST", f"{daemon.url}/v2/{REPO}/blobs/uploads/", body=b"")
    assert status == 202, headers
    return headers["Location"]


def _tmp_bytes(store: Path) -> int:
    tmp = store / "tmp"
    return sum(p.stat().st_size for p in tmp.iterdir()) if tmp.is_dir() else 0


def _stream_upload(daemon: Daemon, method: str, path: str, n: int) -> tuple[int, dict[str, str]]:
    """Send an n MiB body with http.client (streamed, never all in memory)."""
    conn = HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request(
            method,
            path,
            body=_chunks(n),
            headers={"Content-Length": str(n * MiB), "Content-Type": "application/octet-stream"},
        )
        resp = conn.getresponse()
        resp.read()
        return resp.status, dict(resp.getheaders())
    finally:
        conn.close()


def _catalog(daemon: Daemon) -> list[str]:
    status, _, body = http("GET", f"{daemon.url}/v2/_catalog")
    assert status == 200
    return list(json.loads(body)["repositories"])


def _push_small(daemon: Daemon) -> str:
    """A tagged image committed before the crash, that must still be there after it."""
    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    cdigest = "sha256:" + hashlib.sha256(config).hexdigest()
    base = f"{daemon.url}/v2/spectro-images/crash/other"
    status, _, _ = http("POST", f"{base}/blobs/uploads/?digest={cdigest}", config)
    assert status == 201
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": cdigest,
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    status, headers, _ = http(
        "PUT",
        f"{base}/manifests/v1",
        manifest,
        {"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert status == 201, headers
    return headers["Docker-Content-Digest"]


# --- SIGKILL in the middle of a large upload ------------------------------------------------------
@pytest.mark.parametrize("kind", ["chunked", "monolithic"])
def test_sigkill_mid_upload_leaves_nothing_and_upload_succeeds_after_restart(
    daemon_factory: Callable[..., Daemon], kind: str
) -> None:
    total = 300  # MiB, generated on the fly
    daemon = daemon_factory()
    store = daemon.root / "store"
    before = _push_small(daemon)
    catalog_before = _catalog(daemon)
    assert catalog_before == ["spectro-images/crash/other"]
    digest = _digest_of(total)

    if kind == "chunked":
        location = _start_upload(daemon)
        head = _request_head(
            "PATCH",
            daemon,
            location,
            {
                "Content-Type": "application/octet-stream",
                "Content-Range": f"0-{total * MiB - 1}",
                "Content-Length": str(total * MiB),
            },
        )
    else:
        location = f"/v2/{REPO}/blobs/uploads/?digest={digest}"
        head = _request_head(
            "POST",
            daemon,
            location,
            {"Content-Type": "application/octet-stream", "Content-Length": str(total * MiB)},
        )
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(head)
        deadline = time.monotonic() + 30
        # send a third of the body, then wait until the daemon has put bytes on disk
        for i in range(total // 3):
            sock.sendall(_chunk(i))
        while _tmp_bytes(store) < 16 * MiB:
            assert time.monotonic() < deadline, "the daemon wrote nothing of the upload"
            time.sleep(0.02)
        assert _tmp_bytes(store) < total * MiB
        daemon.kill()  # SIGKILL, mid-transfer
        assert daemon.proc is not None and daemon.proc.returncode == -signal.SIGKILL
    finally:
        sock.close()
    assert _tmp_bytes(store) > 0  # the crash did leave a partial temp file behind

    daemon.start()  # same root, same port, same config
    assert list((store / "tmp").iterdir()) == []
    status, _, _ = http("HEAD", f"{daemon.url}/v2/{REPO}/blobs/{digest}")
    assert status == 404
    assert not Path(store, "blobs", "sha256", digest[7:9], digest[7:]).exists()
    assert _catalog(daemon) == catalog_before
    status, headers, _ = http("HEAD", f"{daemon.url}/v2/spectro-images/crash/other/manifests/v1")
    assert status == 200 and headers["Docker-Content-Digest"] == before
    if kind == "chunked":  # the session died with the process
        status, _, body = http("GET", f"{daemon.url}{location}")
        assert status == 404 and b"BLOB_UPLOAD_UNKNOWN" in body

    # the same upload, done again, succeeds
    if kind == "chunked":
        location = _start_upload(daemon)
        status, headers = _stream_upload(daemon, "PATCH", location, total)
        assert status == 202, headers
        assert headers["Range"] == f"0-{total * MiB - 1}"
        status, headers, body = http("PUT", f"{daemon.url}{location}?digest={digest}", b"")
    else:
        status, headers = _stream_upload(daemon, "POST", location, total)
    assert status == 201, headers
    assert headers["Docker-Content-Digest"] == digest
    status, headers, _ = http("HEAD", f"{daemon.url}/v2/{REPO}/blobs/{digest}")
    assert status == 200
    assert headers["Content-Length"] == str(total * MiB)
    assert headers["Docker-Content-Digest"] == digest
    committed = store / "blobs" / "sha256" / digest[7:9] / digest[7:]
    h = hashlib.sha256()
    with open(committed, "rb") as f:
        while block := f.read(8 * MiB):
            h.update(block)
    assert "sha256:" + h.hexdigest() == digest
    assert list((store / "tmp").iterdir()) == []


def test_sigterm_mid_upload_exits_0_and_leaves_nothing(
    daemon_factory: Callable[..., Daemon],
) -> None:
    total = 300
    daemon = daemon_factory({"shutdown_timeout": "1s"})
    store = daemon.root / "store"
    digest = _digest_of(total)
    head = _request_head(
        "POST",
        daemon,
        f"/v2/{REPO}/blobs/uploads/?digest={digest}",
        {"Content-Type": "application/octet-stream", "Content-Length": str(total * MiB)},
    )
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        sock.sendall(head)
        for i in range(total // 3):
            sock.sendall(_chunk(i))
        deadline = time.monotonic() + 30
        while _tmp_bytes(store) < 16 * MiB:
            assert time.monotonic() < deadline, "the daemon wrote nothing of the upload"
            time.sleep(0.02)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)  # the client stalls mid-body
        assert daemon.proc.wait(15) == 0
    finally:
        sock.close()
    daemon.start()
    assert list((store / "tmp").iterdir()) == []
    status, _, _ = http("HEAD", f"{daemon.url}/v2/{REPO}/blobs/{digest}")
    assert status == 404


# --- SIGTERM with a download in flight ----------------------------------------------------------
def _push_big(daemon: Daemon, n: int) -> str:
    digest = _digest_of(n)
    status, headers = _stream_upload(
        daemon, "POST", f"/v2/{REPO}/blobs/uploads/?digest={digest}", n
    )
    assert status == 201, headers
    return digest


def _open_download(daemon: Daemon, digest: str) -> tuple[socket.socket, int, bytes]:
    """GET the blob on a raw socket with a small receive buffer; returns (sock, length, body so far)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", daemon.port))
    sock.sendall(_request_head("GET", daemon, f"/v2/{REPO}/blobs/{digest}", {}))
    buf = b""
    deadline = time.monotonic() + 10
    while b"\r\n\r\n" not in buf:
        assert time.monotonic() < deadline
        got = sock.recv(65536)
        assert got, "connection closed before the headers"
        buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    length = next(int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length:"))
    return sock, length, body


def _read_rest(
    sock: socket.socket, first: bytes, length: int, *, rate: float | None, seconds: float
) -> tuple[int, str]:
    """Read up to length bytes; at ``rate`` bytes/s for ``seconds``, then as fast as possible.

    Returns how many body bytes arrived and the sha256 of them."""
    h = hashlib.sha256(first)
    got = len(first)
    slow_until = time.monotonic() + seconds
    deadline = time.monotonic() + 60
    while got < length and time.monotonic() < deadline:
        if rate is not None and time.monotonic() < slow_until:
            time.sleep(64 * 1024 / rate)
        try:
            block = sock.recv(min(1 << 20, length - got))
        except (ConnectionResetError, TimeoutError):
            break
        if not block:
            break
        h.update(block)
        got += len(block)
    return got, "sha256:" + h.hexdigest()


def test_sigterm_lets_inflight_download_finish(daemon_factory: Callable[..., Daemon]) -> None:
    n = 200
    daemon = daemon_factory({"shutdown_timeout": "20s"})
    digest = _push_big(daemon, n)
    sock, length, first = _open_download(daemon, digest)
    try:
        assert length == n * MiB
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        # the listener closes at once: a new client is refused while the old one still reads
        refused = False
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", daemon.port), timeout=1).close()
            except OSError:
                refused = True
                break
            time.sleep(0.02)
        assert refused, "regproxy still accepts connections after SIGTERM"
        got, body_digest = _read_rest(sock, first, length, rate=8 * MiB, seconds=1.5)
    finally:
        sock.close()
    assert got == length
    assert body_digest == digest
    assert daemon.proc.wait(20) == 0
    log = daemon.log()
    assert "shutdown.done" in log
    # its access line, written as it ended during the shutdown, is out before the last line
    (line,) = [ln for ln in log.splitlines() if " request method=GET " in ln and digest in ln]
    assert f" status=200 bytes={length} " in line
    assert log.index(line) < log.index("shutdown.done")


def test_sigterm_cuts_stalled_download_after_shutdown_timeout(
    daemon_factory: Callable[..., Daemon],
) -> None:
    n = 200
    daemon = daemon_factory({"shutdown_timeout": "1s"})
    digest = _push_big(daemon, n)
    sock, length, first = _open_download(daemon, digest)
    try:
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)  # and the client reads nothing at all
        # shutdown_timeout 1s, not the default 30s: a daemon that waited for the stalled client
        # would still be running when this wait gives up
        assert daemon.proc.wait(10) == 0
        got, _ = _read_rest(sock, first, length, rate=None, seconds=0)
    finally:
        sock.close()
    assert got < length, "a stalled 200 MiB download cannot have finished"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_daemon_stops_on_signal_with_exit_0(
    daemon_factory: Callable[..., Daemon], sig: signal.Signals
) -> None:
    daemon = daemon_factory()
    assert daemon.proc is not None
    daemon.proc.send_signal(sig)
    assert daemon.proc.wait(10) == 0
    assert "Traceback" not in daemon.log()


# --- config errors ------------------------------------------------------------------------------
def _regproxy(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REGPROXY_")}
    return subprocess.run(
        [sys.executable, "-m", "regproxy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        cwd=str(REPO_ROOT),
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("storage:\n  rooot: /tmp/x\n", "storage.rooot"),
        ("bogus: 1\n", "bogus"),
        ("tag_ttl: banana\n", "tag_ttl"),
        ("listen: 127.0.0.1:99999\n", "listen"),
        ("content:\n  sync:\n    enable: maybe\n", "content.sync.enable"),
        ("storage:\n  max_size: lots\n", "storage.max_size"),
        ("log:\n  level: loud\n", "log.level"),
        ("upstreams:\n  docker.io:\n    url: ftp://x\n", "upstreams.docker.io.url"),
        ("content:\n  projects:\n    images: a/b\n", "content.projects.images"),
    ],
)
def test_bad_config_exits_2_with_one_line_naming_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    for args in (
        ("--config", str(cfg), "serve"),
        ("serve", "--config", str(cfg)),  # as daemons are started: the option after the command
        ("check-config", "-c", str(cfg)),
    ):
        proc = _regproxy(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert key in lines[0], lines[0]
        assert "Traceback" not in proc.stderr


def test_bad_environment_override_names_the_key(tmp_path: Path) -> None:
    proc = _regproxy("check-config", env={"REGPROXY_LOG_LEVEL": "loud"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "log.level" in lines[0] and "REGPROXY_LOG_LEVEL" in lines[0]


def test_invalid_yaml_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("storage: [\n")
    proc = _regproxy("--config", str(cfg), "serve")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_config_file_exits_1(tmp_path: Path) -> None:
    proc = _regproxy("--config", str(tmp_path / "nope.yaml"), "serve")
    assert proc.returncode == 1
    assert "nope.yaml" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_check_config_without_config(tmp_path: Path) -> None:
    proc = _regproxy("check-config", env={"REGPROXY_LISTEN": "127.0.0.1:1234"})
    assert proc.returncode == 0, proc.stderr
    assert "1234" in proc.stdout


# --- serve with no config, as a user who is not root ---------------------------------------------
def _nobody_prefix() -> list[str] | None:
    """A setpriv command line that runs this interpreter as nobody, or None if it can't.

    When the interpreter lives where nobody may not read (pyenv under /root), nobody gets
    CAP_DAC_READ_SEARCH as an ambient capability: it can then read the Python install, but
    every write still needs nobody's own permissions, which is what this test is about.
    """
    base = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    probe = [sys.executable, "-c", "import aiohttp, uvloop, yaml, regproxy"]
    for extra in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        ok = subprocess.run(
            [*base, *extra, *probe], cwd=str(REPO_ROOT), capture_output=True, timeout=30
        )
        if ok.returncode == 0:
            return [*base, *extra]
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv missing")
def test_serve_without_config_as_nobody() -> None:
    prefix = _nobody_prefix()
    if prefix is None:
        pytest.skip(f"{sys.executable} cannot be run by nobody")
    home = Path(tempfile.mkdtemp(prefix="regproxy-nobody-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        os.chmod(home, 0o755)
        os.chown(home, 65534, 65534)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REGPROXY_", "XDG_"))}
        env.pop("STATE_DIRECTORY", None)
        env.update(HOME=str(home), REGPROXY_LISTEN=f"127.0.0.1:{port}")
        log = open(home / "out.log", "wb")  # noqa: SIM115 - closed right below
        with log:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "regproxy", "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO_ROOT),
            )
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=proc)
        except Exception:
            print((home / "out.log").read_text(errors="replace"))
            raise
        store = home / ".local" / "state" / "regproxy"
        assert (store / "LAYOUT_VERSION").is_file()
        assert (store / "index.db").is_file()
        assert store.stat().st_uid == 65534
        data = b"written by nobody"
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, _, _ = http(
            "POST",
            f"http://127.0.0.1:{port}/v2/spectro-images/mine/blobs/uploads/?digest={digest}",
            data,
        )
        assert status == 201
        assert (store / "blobs" / "sha256" / digest[7:9] / digest[7:]).stat().st_uid == 65534
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc is not None:
            stop_process(proc)
        with contextlib.suppress(Exception):
            shutil.rmtree(home)
