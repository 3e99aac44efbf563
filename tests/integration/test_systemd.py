"""systemd: the shipped unit passes ``systemd-analyze verify``; the daemon speaks sd_notify."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from regproxy.systemd import Notifier, watchdog_interval
from tests.peers import REPO_ROOT, Daemon, have

UNIT = REPO_ROOT / "systemd" / "regproxy.service"
SHIPPED_EXEC = "/usr/local/bin/regproxy"


def _verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=unit.parent,
    )


def _installed_copy(tmp_path: Path, text: str) -> Path:
    """The unit as an operator installs it: the binary at ExecStart exists.

    Only the ExecStart path changes (``/usr/local/bin/regproxy`` need not exist on the test
    machine); every other line is the shipped file's.
    """
    exe = shutil.which("regproxy") or sys.executable
    copy = tmp_path / "regproxy.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={exe} "))
    return copy


@pytest.mark.skipif(not have("systemd-analyze"), reason="systemd missing")
@pytest.mark.process
def test_unit_verifies(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} --config /etc/regproxy/regproxy.yaml serve" in text
    for line in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "StateDirectory=regproxy",
        "User=regproxy",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "ReadWritePaths=/var/lib/regproxy",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "LimitNOFILE=65536",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text.splitlines(), line
    copy = _installed_copy(tmp_path, text)
    assert (
        sum(a != b for a, b in zip(text.splitlines(), copy.read_text().splitlines(), strict=True))
        == 1
    )
    proc = _verify(copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "", proc.stderr  # no warnings either

    # and verify does catch mistakes, so the pass above means something
    broken = _installed_copy(tmp_path, text.replace("Type=notify", "Type=notifyy"))
    broken.rename(tmp_path / "broken.service")
    assert "notifyy" in _verify(tmp_path / "broken.service").stderr


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd would listen (short path: unix socket limit)."""
    d = tempfile.mkdtemp(prefix="rp-notify-", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def _receive_until(
    sock: socket.socket, want: Callable[[list[str]], bool], timeout: float = 20
) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not want(got):
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return got


def _states(messages: list[str]) -> list[str]:
    return [line for m in messages for line in m.splitlines()]


def test_daemon_notifies_ready_watchdog_stopping(
    daemon_factory: Callable[..., Daemon], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    d = daemon_factory(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}, start=False)
    d.start(wait=False)
    msgs = _receive_until(sock, lambda m: _states(m).count("WATCHDOG=1") >= 3)
    states = _states(msgs)
    assert "READY=1" in states, d.log()
    assert states.count("WATCHDOG=1") >= 3, (states, d.log())
    # READY=1 comes once the listener accepts: the first ping follows it
    assert states.index("READY=1") < states.index("WATCHDOG=1")
    with socket.create_connection(("127.0.0.1", d.port), timeout=5):
        pass
    assert d.stop() == 0
    rest = _states(_receive_until(sock, lambda m: "STOPPING=1" in _states(m), timeout=5))
    assert "STOPPING=1" in rest, (rest, d.log())


def test_no_notify_socket_no_notifications(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()  # NOTIFY_SOCKET is removed from the environment by Daemon
    assert d.stop() == 0
    assert "systemd.ready" not in d.log()


async def test_abstract_socket_and_watchdog_env() -> None:
    name = f"@regproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name[1:].encode())
    sock.setblocking(False)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "100000"})
        assert n.enabled and n.watchdog == pytest.approx(0.05)
        stop = asyncio.Event()
        n.stop_on(stop)
        n.ready(1234)
        states: list[str] = []

        def receive() -> None:
            while True:
                try:
                    states.extend(sock.recv(4096).decode().splitlines())
                except BlockingIOError:
                    return

        for _ in range(500):  # bounded: 5 s; pings come every 0.05 s
            receive()
            if states.count("WATCHDOG=1") >= 2:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.sleep(0.01)
        await n.close()
        receive()
        assert states[0] == "READY=1"
        assert states.count("WATCHDOG=1") >= 2
        assert "STOPPING=1" in states and "STATUS=shutting down" in states
    finally:
        sock.close()
    # a watchdog meant for another process, none asked for, or none at all
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None
    assert not Notifier.from_env({}).notify("READY=1")
