"""install.sh the way an operator runs it: as root, with systemd, no --prefix, no network.

There is no systemd on the test machine, so the host is a sandbox of namespaces: a PID, mount
and network namespace (loopback only) in which ``/etc`` is a copy, ``/opt``, ``/var/lib``,
``/run`` and ``/usr/lib/sysusers.d`` are empty tmpfs, and ``systemctl`` is a stand-in that does
what systemd would for this unit: ``restart`` runs ``ExecStart`` as ``User=`` with
``$STATE_DIRECTORY`` and succeeds once ``/readyz`` answers (``Type=notify``). Everything else is
real: ``systemd-sysusers`` makes the user, ``runuser`` runs the bundle import, the daemon runs
as ``regproxy``. When the namespace's first process ends the kernel ends every process in it.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.release import (
    HOST_ENV,
    IMAGE,
    NEWER,
    PORT,
    VERSION,
    Builds,
    make_bundle,
    ok,
    run,
    unpack,
)

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]

FAKE_SYSTEMCTL = f"""#!/bin/bash
# systemctl stand-in: records its arguments; restart/stop manage regproxy as systemd would
set -u
echo "$*" >> /run/systemctl.log
unit=/etc/systemd/system/regproxy.service
stop() {{
  [ -f /run/regproxy.pid ] || return 0
  pid=$(cat /run/regproxy.pid)
  kill "$pid" 2>/dev/null
  for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  rm -f /run/regproxy.pid
}}
case "$1" in
  restart)
    stop
    # a version the test marks as broken does not start
    [ -f "/run/broken-$(readlink /opt/regproxy/current)" ] && exit 1
    cmd=$(sed -n 's/^ExecStart=//p' "$unit")
    user=$(sed -n 's/^User=//p' "$unit")
    STATE_DIRECTORY=/var/lib/regproxy REGPROXY_LISTEN=127.0.0.1:{PORT} \\
      setsid setpriv --reuid="$user" --regid="$user" --init-groups -- $cmd \\
      >> /run/regproxy.log 2>&1 < /dev/null 9>&- &
    echo $! > /run/regproxy.pid
    for _ in $(seq 600); do
      curl -sf http://127.0.0.1:{PORT}/readyz > /dev/null && exit 0
      kill -0 $! 2>/dev/null || exit 1
      sleep 0.05
    done
    exit 1 ;;
  disable) [ "${{2:-}}" = --now ] && stop; exit 0 ;;
  *) exit 0 ;;
esac
"""

SETUP = """set -euo pipefail
cp -a /etc "$1/etc"
mount --bind "$1/etc" /etc
for d in /opt /var/lib /run /usr/lib/sysusers.d; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
mkdir -p /run/systemd/system
ip link set lo up
touch "$1/ready"
exec sleep 3600
"""


class SystemdHost:
    """The sandbox described in the module docstring; ``run`` executes a command inside it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "bin").mkdir(parents=True)
        (root / "bin" / "systemctl").write_text(FAKE_SYSTEMCTL)
        (root / "bin" / "systemctl").chmod(0o755)
        self.env = {**HOST_ENV, "PATH": f"{root / 'bin'}:{HOST_ENV['PATH']}"}
        self.unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net",
             "--propagation", "private", "--", "bash", "-c", SETUP, "setup", str(root)],
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not (root / "ready").exists():
            assert self.unshare.poll() is None, "the sandbox's setup failed"
            assert time.monotonic() < deadline, "the sandbox did not come up"
            time.sleep(0.05)
        children = Path(f"/proc/{self.unshare.pid}/task/{self.unshare.pid}/children")
        self.init = int(children.read_text().split()[0])  # PID 1 inside, seen from outside

    def run(self, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = [f"{k}={v}" for k, v in self.env.items()]
        ns = ["nsenter", "-t", str(self.init), "-m", "-n", "-p", "--", "env", "-i", *env]
        return run([*ns, *cmd], timeout=timeout)

    def sh(self, script: str) -> str:
        return ok(self.run("bash", "-c", script)).strip()

    def pull(self, out: Path) -> str:
        shutil.rmtree(out, ignore_errors=True)
        ok(self.run("skopeo", "copy", "--src-tls-verify=false",
                    f"docker://127.0.0.1:{PORT}/{IMAGE}", f"dir:{out}"))  # fmt: skip
        return "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()

    def close(self) -> None:
        # unshare ignores SIGTERM while it waits; killed, its --kill-child takes PID 1 inside
        # with it, and the kernel then ends every process of the namespace
        self.unshare.kill()
        self.unshare.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.init}").exists():
            assert time.monotonic() < deadline, f"the sandbox's PID 1 ({self.init}) outlived it"
            time.sleep(0.05)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[SystemdHost]:
    h = SystemdHost(tmp_path / "sandbox")
    try:
        yield h
    finally:
        h.close()


def test_systemd_install_upgrade_switch_back_rollback(
    release_builds: Builds, sandbox: SystemdHost, tmp_path: Path
) -> None:
    img, bundle = make_bundle(tmp_path)
    old = unpack(release_builds.first, tmp_path / "old")
    new = unpack(release_builds.newer, tmp_path / "new")
    # the service's user reads the bundle: it lies where anyone may read it
    sandbox.sh(f"install -m 0644 {bundle} /run/bundle.tar")

    # 1. first install: user, config, unit, store, the bundle imported as regproxy, started
    out = ok(sandbox.run(str(old / "install.sh"), "--with-bundle", "/run/bundle.tar"))
    assert f"regproxy {VERSION} is current in /opt/regproxy" in out
    assert (
        sandbox.sh("getent passwd regproxy | cut -d: -f6,7")
        == "/var/lib/regproxy:/usr/sbin/nologin"
    )
    assert sandbox.sh("stat -c '%U %G %a' /etc/regproxy/regproxy.yaml") == "root regproxy 640"
    assert sandbox.sh("stat -c '%U %G %a' /var/lib/regproxy") == "regproxy regproxy 750"
    unit = sandbox.sh("cat /etc/systemd/system/regproxy.service")
    assert (
        "ExecStart=/opt/regproxy/current/bin/regproxy --config /etc/regproxy/regproxy.yaml serve"
        in unit
    )
    assert sandbox.sh("cat /usr/lib/sysusers.d/regproxy.conf").startswith("# systemd-sysusers")
    assert sandbox.sh("cat /run/systemctl.log").splitlines() == [
        "daemon-reload",
        "enable --quiet regproxy.service",
        "restart regproxy.service",
    ]
    assert sandbox.sh("ps -o user= -p $(cat /run/regproxy.pid)") == "regproxy"
    # the import went into the service's store, as its user: nothing there belongs to root
    assert (
        sandbox.sh("test -f /var/lib/regproxy/index.db && find /var/lib/regproxy ! -user regproxy")
        == ""
    )
    assert sandbox.pull(tmp_path / "p1") == img.digest

    # 2. an upgrade whose version does not start: switched back by itself, the old one serves
    sandbox.sh(f"touch /run/broken-{NEWER}")
    proc = sandbox.run(str(new / "install.sh"))
    assert proc.returncode == 1
    assert f"regproxy {NEWER} did not start" in proc.stderr
    assert f"switched back to {VERSION}" in proc.stderr
    assert sandbox.sh("readlink /opt/regproxy/current /opt/regproxy/previous").split() == [
        VERSION,
        NEWER,
    ]
    assert sandbox.pull(tmp_path / "p2") == img.digest

    # 3. once it starts, --rollback makes the previous (here: the newer) version current
    sandbox.sh(f"rm /run/broken-{NEWER}")
    out = ok(sandbox.run(str(new / "install.sh"), "--rollback"))
    assert f"rolled back from {VERSION} to {NEWER}" in out
    links = sandbox.sh("readlink /opt/regproxy/current /opt/regproxy/previous").split()
    assert links == [NEWER, VERSION]
    assert sandbox.sh("/opt/regproxy/current/bin/regproxy --version").split()[-1] == NEWER
    assert sandbox.sh("ps -o user= -p $(cat /run/regproxy.pid)") == "regproxy"
    assert sandbox.pull(tmp_path / "p3") == img.digest  # the store is the same

    # 4. and again: back where it was, restarted
    out = ok(sandbox.run(str(old / "install.sh"), "--rollback"))
    assert f"rolled back from {NEWER} to {VERSION}" in out
    assert sandbox.sh("tail -n1 /run/systemctl.log") == "restart regproxy.service"
    assert sandbox.pull(tmp_path / "p4") == img.digest

    # 5. uninstall: service stopped and disabled, program gone, config and store kept
    ok(sandbox.run(str(old / "uninstall.sh")))
    assert "disable --now --quiet regproxy.service" in sandbox.sh("cat /run/systemctl.log")
    assert (
        sandbox.sh("test -e /opt/regproxy || echo gone; test -e /run/regproxy.pid || echo stopped")
        == "gone\nstopped"
    )
    assert sandbox.sh("ls /etc/regproxy /var/lib/regproxy/index.db") != ""
