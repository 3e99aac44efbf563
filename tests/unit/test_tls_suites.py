"""The listener picks the TLS 1.3 cipher suite the client lists first (regproxy.tls): Go clients
(containerd, skopeo) list AES-128-GCM first on hosts with AES instructions and
ChaCha20-Poly1305 first on hosts without; OpenSSL's server order would give them AES-256-GCM."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from regproxy.tls import ServerTLS
from tests.certs import self_signed

pytestmark = [
    pytest.mark.process,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl missing"),
]

AES128 = "TLS_AES_128_GCM_SHA256"
AES256 = "TLS_AES_256_GCM_SHA384"
CHACHA = "TLS_CHACHA20_POLY1305_SHA256"


def _negotiated(tls: ServerTLS, offered: list[str]) -> str:
    """The suite of one handshake with ``openssl s_client`` offering ``offered`` in order."""
    got: list[str] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with tls.context.wrap_socket(conn, server_side=True) as s:
                cipher = s.cipher()
                got.append(cipher[0] if cipher else "")

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            suites = ["-tls1_3", "-ciphersuites", ":".join(offered)]
            subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *suites],
                input=b"",
                capture_output=True,
                timeout=30,
                check=False,
            )
        finally:
            server.join(30)
    assert got, "no handshake completed"
    return got[0]


@pytest.mark.parametrize(
    ("offered", "picked"),
    [
        ([AES128, AES256, CHACHA], AES128),  # Go on AES hardware
        ([CHACHA, AES128, AES256], CHACHA),  # Go without AES instructions
        ([AES256, CHACHA, AES128], AES256),  # OpenSSL clients (curl, wrk)
    ],
)
def test_the_clients_first_suite_is_used(tmp_path: Path, offered: list[str], picked: str) -> None:
    cert, key = self_signed(tmp_path, "server")
    assert _negotiated(ServerTLS(str(cert), str(key)), offered) == picked


def test_a_reloaded_certificate_keeps_the_clients_order(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "server")
    for swap in (False, True):  # in place (event loop) and a fresh context (TLS workers)
        tls = ServerTLS(str(cert), str(key))
        tls.swap = swap
        assert tls.reload()
        assert _negotiated(tls, [AES128, AES256]) == AES128
