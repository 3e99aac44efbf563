"""TLS on the listener: skopeo trusts a certificate made here; SIGHUP serves a new one."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.images import make_image, write_layout
from tests.peers import Daemon, have, skopeo

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(not (have("skopeo") and have("openssl")), reason="skopeo/openssl missing"),
]


def _make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=127.0.0.1/O={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def _cert_dir(directory: Path, cert: Path) -> Path:
    """What containers/image reads: a directory with the CA as ca.crt."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(cert.read_bytes())
    return directory


def _served_der(port: int) -> bytes:
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    return ssl.PEM_cert_to_DER_cert(pem)


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _replace(src: Path, dest: Path) -> None:
    """As an operator's cert tooling does: write beside, rename over."""
    tmp = dest.with_suffix(".new")
    tmp.write_bytes(src.read_bytes())
    os.replace(tmp, dest)


def _wait_served(port: int, want: bytes, timeout: float = 10) -> bytes:
    deadline = time.monotonic() + timeout
    got = b""
    while time.monotonic() < deadline:
        got = _served_der(port)
        if got == want:
            break
        time.sleep(0.05)
    return got


def _wait_log(d: Daemon, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in d.log():
            return True
        time.sleep(0.05)
    return False


def test_tls_skopeo_trusts_cert_and_sighup_reloads(
    daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    first_cert, first_key = _make_cert(certs, "first")
    live_cert, live_key = certs / "tls.crt", certs / "tls.key"
    _replace(first_cert, live_cert)
    _replace(first_key, live_key)
    # TLS on worker threads (regproxy.tls_relay; the default on hosts of more than 2 CPUs)
    d = daemon_factory({"tls": {"cert": str(live_cert), "key": str(live_key), "workers": 2}})
    assert d.url.startswith("https://")
    assert _served_der(d.port) == _der(first_cert)
    assert "tls_workers=2" in d.log()

    img = make_image("amd64")
    layout = tmp_path / "layout"
    write_layout(layout, {"v1": img})
    ref = f"docker://{d.hostport}/spectro-images/tls/app:v1"
    trust = _cert_dir(tmp_path / "trust-first", first_cert)

    # verification is on: without the CA skopeo refuses the certificate
    refused = skopeo("copy", f"oci:{layout}:v1", ref, check=False)
    assert refused.returncode != 0
    assert "certificate" in refused.stderr, refused.stderr

    skopeo("copy", "--dest-cert-dir", str(trust), f"oci:{layout}:v1", ref)
    out = tmp_path / "out"
    skopeo("copy", "--src-cert-dir", str(trust), ref, f"oci:{out}:v1")
    raw = skopeo("inspect", "--cert-dir", str(trust), "--raw", ref).stdout
    assert raw.encode() == img.manifest

    # a new certificate in place of the old one, then SIGHUP: new handshakes get it
    second_cert, second_key = _make_cert(certs, "second")
    _replace(second_cert, live_cert)
    _replace(second_key, live_key)
    assert _served_der(d.port) == _der(first_cert)  # nothing changes before the signal
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    assert _wait_served(d.port, _der(second_cert)) == _der(second_cert), d.log()
    assert _wait_log(d, "tls.reloaded"), d.log()
    new_trust = _cert_dir(tmp_path / "trust-second", second_cert)
    assert skopeo("inspect", "--cert-dir", str(new_trust), "--raw", ref).stdout == raw
    old_trust = skopeo("inspect", "--cert-dir", str(trust), "--raw", ref, check=False)
    assert old_trust.returncode != 0

    # a broken pair is refused on reload: the working certificate stays
    live_cert.write_text("not a certificate\n")
    d.proc.send_signal(signal.SIGHUP)
    assert _wait_log(d, "tls.reload_failed"), d.log()
    assert d.proc.poll() is None
    assert _served_der(d.port) == _der(second_cert)
    assert d.stop() == 0


def test_plain_http_when_tls_not_configured(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    assert d.url.startswith("http://")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)  # reload with nothing to reload: logged, still running
    assert _wait_log(d, "tls.reload_skipped"), d.log()
    assert d.proc.poll() is None
    assert d.stop() == 0


def _tls_daemon(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, name: str, workers: int
) -> tuple[Daemon, ssl.SSLContext]:
    """A daemon on HTTPS with a 1 s write_timeout, and a client context that trusts it."""
    cert, key = _make_cert(tmp_path / "certs", name)
    d = daemon_factory(
        {
            "tls": {"cert": str(cert), "key": str(key), "workers": workers},
            "http": {"write_timeout": "1s"},
        }
    )
    return d, ssl.create_default_context(cafile=str(cert))


def _push_tls(d: Daemon, client: ssl.SSLContext, repo: str, blob: bytes) -> str:
    """Push a blob over HTTPS (one POST); its digest."""
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=client, timeout=30)
    conn.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", body=blob)
    assert conn.getresponse().status == 201
    conn.close()
    return digest


@pytest.mark.parametrize("workers", [0, 2], ids=["in-loop", "workers"])
def test_a_stalled_tls_reader_is_cut_after_write_timeout_and_logged_with_its_address(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, workers: int
) -> None:
    """Over TLS (on the event loop, or relayed by worker threads) the deadlines bite as on
    plain HTTP, and the access line names the client's address, not the relay's socket."""
    d, client = _tls_daemon(daemon_factory, tmp_path, "stall", workers)
    big = os.urandom(16 * 1024 * 1024)
    digest = _push_tls(d, client, "stall", big)

    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, as a slow reader
    raw.settimeout(30)
    raw.connect(("127.0.0.1", d.port))
    s = client.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        s.sendall(f"GET /v2/stall/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        # it takes nothing now: the daemon cuts it after write_timeout (1 s)
        deadline = time.monotonic() + 30
        lines: list[str] = []
        while not lines and time.monotonic() < deadline:
            lines = [ln for ln in d.log().splitlines() if f"/v2/stall/blobs/{digest}" in ln]
            time.sleep(0.05)
        assert lines and "error=client_stalled" in lines[0], d.log()[-2000:]
        assert "remote=127.0.0.1 " in lines[0], lines[0]  # not the relay's local socket
        got = 0
        with contextlib.suppress(OSError):  # a reset counts as the end
            while chunk := s.recv(1 << 20):
                got += len(chunk)
        assert got < len(big)  # what was in between, then the end: never the whole blob
    finally:
        s.close()
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("workers", [0, 2], ids=["in-loop", "workers"])
def test_hostile_tls_clients_leave_no_descriptor_or_traceback(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, workers: int
) -> None:
    """Connections dropped before, in and after the handshake, garbage under TLS, and clients
    that take none of a 4 MiB answer (it fits in the socket pair and TCP buffers: the event
    loop's side is done with it, the worker cuts it after write_timeout): afterwards the daemon
    holds the descriptors it held before, and its log shows no crash."""
    d, client = _tls_daemon(daemon_factory, tmp_path, "hostile", workers)
    assert d.proc is not None
    pid = d.proc.pid
    blob = os.urandom(4 * 1024 * 1024)
    digest = _push_tls(d, client, "hostile", blob)

    def tls() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        return client.wrap_socket(raw, server_hostname="127.0.0.1")

    def reset(s: socket.socket) -> None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()

    def counts() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    s = tls()  # the worker threads' loops made their own descriptors
    s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
    time.sleep(0.3)  # the connection's descriptors closed (bounded: a settling pause)
    before = counts()
    stuck = []
    for _ in range(4):  # take none of a 4 MiB answer
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", d.port))
        s = client.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(f"GET /v2/hostile/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        stuck.append(s)
    try:
        for _ in range(30):
            socket.create_connection(("127.0.0.1", d.port)).close()  # before the hello
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # half a hello
            reset(s)
            reset(tls())  # after the handshake
            s = tls()
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHo")  # half a request
            socket.socket.send(s, os.urandom(64))  # then garbage under TLS
            s.close()
            s = tls()  # in the middle of an answer
            s.sendall(f"GET /v2/hostile/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.recv(1000)
            reset(s)
        deadline = time.monotonic() + 30
        while counts() != before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert counts() == before, (before, counts(), os.listdir(f"/proc/{pid}/fd"))
    finally:
        for s in stuck:
            s.close()
    assert http_ok(d.port, client)
    log = d.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    # the stuck readers, cut: by the worker, or by the event loop's send when the answer did
    # not fit in between (then the client's side goes with it)
    assert "connection.write_stalled" in log or "error=client_stalled" in log, log[-3000:]


def http_ok(port: int, client: ssl.SSLContext) -> bool:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client, timeout=10)
    try:
        conn.request("GET", "/v2/")
        return conn.getresponse().status == 200
    finally:
        conn.close()
