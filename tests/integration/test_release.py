"""The offline release archive: built twice byte-identical, installed where there is no network.

``scripts/build-release.sh`` needs the package index only while its wheel cache
(``~/.cache/regproxy-release-wheels``) is cold: an unreachable index then FAILS this module,
it never skips. Installs run inside a network namespace with nothing but loopback (``unshare
-n``), as on an air-gapped host: install with a bundle, pull the bundle's image from the
installed daemon, upgrade to a newer build (config and store kept, image still served),
roll back, uninstall (config and store kept).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import REPO_ROOT, stop_process
from tests.release import (
    HOST_ENV,
    IMAGE,
    NEWER,
    PORT,
    VERSION,
    Builds,
    make_bundle,
    ok,
    python,
    run,
    unpack,
)

pytestmark = [pytest.mark.peers, pytest.mark.timeout(900)]


def test_two_builds_of_one_commit_are_byte_identical(release_builds: Builds) -> None:
    assert release_builds.first.name == f"regproxy-{VERSION}-linux-x86_64.tar.gz"
    assert release_builds.first.read_bytes() == release_builds.again.read_bytes()
    assert release_builds.newer.name == f"regproxy-{NEWER}-linux-x86_64.tar.gz"


def test_archive_holds_wheels_for_311_and_312_licences_and_checksums(
    release_builds: Builds, tmp_path: Path
) -> None:
    with tarfile.open(release_builds.first) as tar:
        members = tar.getmembers()
    assert all(m.uid == 0 and m.gid == 0 and m.uname in ("", "root") for m in members)
    assert len({m.mtime for m in members}) == 1  # one fixed time for every entry
    top = unpack(release_builds.first, tmp_path)
    assert top.name == f"regproxy-{VERSION}-linux-x86_64"
    assert (top / "VERSION").read_text().strip() == VERSION
    for script in ("install.sh", "uninstall.sh"):
        assert os.access(top / script, os.X_OK)
    for rel in ("systemd/regproxy.service", "systemd/regproxy.sysusers", "config/regproxy.yaml"):
        assert (top / rel).read_bytes() == (REPO_ROOT / rel).read_bytes()
    ok(run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=top))
    listed = {line.split("  ", 1)[1] for line in (top / "SHA256SUMS").read_text().splitlines()}
    files = {str(p.relative_to(top)) for p in top.rglob("*") if p.is_file()}
    assert listed == files - {"SHA256SUMS"}

    wheels = sorted(p.name for p in (top / "wheels").glob("*.whl"))
    assert f"regproxy-{VERSION}-py3-none-any.whl" in wheels
    assert any(w.startswith("pip-") for w in wheels)  # install.sh needs no pip on the host
    dists = {w.split("-")[0].lower() for w in wheels}
    assert {"aiohttp", "uvloop", "pyyaml", "prometheus_client", "bcrypt", "jinja2"} <= dists
    for w in wheels:  # every compiled wheel comes for both interpreters, on manylinux x86_64
        tags = w.removesuffix(".whl").split("-")[-3:]
        if tags[0].startswith("cp3") and tags[1] != "abi3":
            assert "x86_64" in tags[2] and "manylinux" in tags[2], w
            other = "cp312" if tags[0] == "cp311" else "cp311"
            assert w.replace(tags[0], other) in wheels, f"{w} has no {other} twin"
    licences = (top / "licenses" / "README.txt").read_text()
    for w in wheels:
        key = "-".join(w.split("-")[:2])
        assert key in licences, key
        if not key.startswith("regproxy-"):  # regproxy itself declares no licence yet
            assert any((top / "licenses" / key).iterdir()), f"no licence text for {key}"
    # the constraints pin what is bundled (a new dependency needs --update-constraints)
    pins = {
        line.split("==")[0].lower()
        for line in (REPO_ROOT / "scripts/release/constraints.txt").read_text().splitlines()
        if "==" in line
    }
    assert dists - {"regproxy"} <= pins


# --- installing in a namespace with no network ---------------------------------------------------


class Host:
    """A network namespace with only loopback: an air-gapped host for install.sh and the daemon."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.holder = subprocess.Popen(["unshare", "-n", "--", "sleep", "3600"])
        self.daemon: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + 10
        while (
            run(["readlink", f"/proc/{self.holder.pid}/ns/net"]).stdout
            == run(["readlink", "/proc/self/ns/net"]).stdout
        ):
            assert time.monotonic() < deadline, "unshare -n did not make a namespace"
            time.sleep(0.05)
        ok(self.run(["ip", "link", "set", "lo", "up"]))
        links = self.run(["ip", "-o", "link"]).stdout.splitlines()
        assert len(links) == 1 and ": lo:" in links[0], links  # loopback, nothing else
        assert "default" not in ok(self.run(["ip", "route"]))

    def run(
        self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        pre = ["nsenter", "-t", str(self.holder.pid), "-n", "--"]
        if env is not None:
            pre += ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        return run([*pre, *cmd], timeout=timeout)

    def start(self, prefix: Path) -> None:
        log = open(self.root / "daemon.log", "ab")  # noqa: SIM115 - closed with the process
        self.daemon = subprocess.Popen(
            [
                "nsenter", "-t", str(self.holder.pid), "-n", "--",
                str(prefix / "opt/regproxy/current/bin/regproxy"),
                "--config", str(prefix / "etc/regproxy/regproxy.yaml"), "serve",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**HOST_ENV, "REGPROXY_LISTEN": f"127.0.0.1:{PORT}"},
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while self.run(["curl", "-sf", f"http://127.0.0.1:{PORT}/readyz"]).returncode != 0:
            assert self.daemon.poll() is None, self.log()
            assert time.monotonic() < deadline, f"not ready in 30s:\n{self.log()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.daemon is not None:
            stop_process(self.daemon)
            self.daemon = None

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")

    def close(self) -> None:
        self.stop()
        stop_process(self.holder)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    try:
        yield h
    finally:
        h.close()


def pull(host: Host, out: Path) -> str:
    """skopeo copy of the bundle's image from the installed daemon; its manifest digest."""
    shutil.rmtree(out, ignore_errors=True)
    ok(
        host.run(
            [
                "skopeo", "copy", "--src-tls-verify=false",
                f"docker://127.0.0.1:{PORT}/{IMAGE}", f"dir:{out}",
            ]
        )
    )  # fmt: skip
    return "sha256:" + hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


def installed_version(host: Host, prefix: Path) -> str:
    out = ok(host.run([str(prefix / "opt/regproxy/current/bin/regproxy"), "--version"], HOST_ENV))
    return out.split()[-1]


def test_install_upgrade_rollback_without_network(
    release_builds: Builds, host: Host, tmp_path: Path
) -> None:
    img, bundle = make_bundle(tmp_path)
    old, new = (
        unpack(release_builds.first, tmp_path / "old"),
        unpack(release_builds.newer, tmp_path / "new"),
    )
    prefix = tmp_path / "host"
    opt, conf = prefix / "opt/regproxy", prefix / "etc/regproxy/regproxy.yaml"

    # 1. first install, with the bundle, on the host's own python3 (found on PATH)
    out = ok(
        host.run(
            [str(old / "install.sh"), "--prefix", str(prefix), "--no-systemd",
             "--with-bundle", str(bundle)],
            HOST_ENV,
        )
    )  # fmt: skip
    assert f"regproxy {VERSION} is current" in out
    assert os.readlink(opt / "current") == VERSION
    assert not (opt / "previous").exists()
    unit = (prefix / "etc/systemd/system/regproxy.service").read_text()
    assert f"ExecStart={opt}/current/bin/regproxy --config {conf} serve" in unit
    assert (prefix / "usr/lib/sysusers.d/regproxy.conf").read_bytes() == (
        REPO_ROOT / "systemd/regproxy.sysusers"
    ).read_bytes()
    assert f"root: {prefix}/var/lib/regproxy" in conf.read_text()
    # the operator's edit: this host is air-gapped; an upgrade must keep it
    conf.write_text(conf.read_text().replace("    enable: true", "    enable: false", 1))

    host.start(prefix)
    assert installed_version(host, prefix) == VERSION
    assert pull(host, tmp_path / "pull1") == img.digest
    layer = tmp_path / "pull1" / hashlib.sha256(img.layers[0]).hexdigest()
    assert layer.read_bytes() == img.layers[0]
    host.stop()
    store = prefix / "var/lib/regproxy"
    blob = store / "blobs/sha256" / img.digest[7:9] / img.digest[7:]
    assert blob.is_file()

    # 2. upgrade: the newer archive's install.sh (on Python 3.12 when this machine has one)
    py312 = python(12)
    args = [str(new / "install.sh"), "--prefix", str(prefix), "--no-systemd"]
    out = ok(host.run([*args, *(["--python", py312] if py312 else [])], HOST_ENV))
    assert f"keeping the config {conf}" in out
    assert os.readlink(opt / "current") == NEWER
    assert os.readlink(opt / "previous") == VERSION
    assert "    enable: false" in conf.read_text()
    assert blob.is_file()
    if py312:
        assert glob.glob(str(opt / NEWER / "lib/python3.12/site-packages/aiohttp"))
    host.start(prefix)
    assert installed_version(host, prefix) == NEWER
    assert pull(host, tmp_path / "pull2") == img.digest  # from the kept store: sync is off
    host.stop()

    # 3. roll back: the previous version is current again, and serves the same store
    out = ok(host.run([str(new / "install.sh"), "--rollback", "--prefix", str(prefix),
                       "--no-systemd"], HOST_ENV))  # fmt: skip
    assert f"rolled back from {NEWER} to {VERSION}" in out
    assert os.readlink(opt / "current") == VERSION
    assert os.readlink(opt / "previous") == NEWER
    host.start(prefix)
    assert installed_version(host, prefix) == VERSION
    assert pull(host, tmp_path / "pull3") == img.digest
    status = host.run(["curl", "-s", f"http://127.0.0.1:{PORT}/readyz"])
    assert json.loads(status.stdout)["ready"] is True
    host.stop()

    # 4. uninstall keeps config and store
    ok(host.run([str(old / "uninstall.sh"), "--prefix", str(prefix), "--no-systemd"], HOST_ENV))
    assert not opt.exists()
    assert conf.is_file() and blob.is_file()


def test_install_says_what_is_missing(release_builds: Builds, host: Host, tmp_path: Path) -> None:
    top = unpack(release_builds.first, tmp_path / "a")
    prefix = tmp_path / "host"
    fake = tmp_path / "python-old"
    fake.write_text("#!/bin/sh\necho 3.9.18\n")
    fake.chmod(0o755)
    proc = host.run([str(top / "install.sh"), "--prefix", str(prefix), "--no-systemd",
                     "--python", str(fake)], HOST_ENV)  # fmt: skip
    assert proc.returncode == 1
    assert "needs Python 3.11 or 3.12 with its venv module" in proc.stderr
    assert f"{fake}: Python 3.9.18" in proc.stderr
    no_venv = tmp_path / "python-no-venv"
    no_venv.write_text("#!/bin/sh\necho 3.11.2\nexit 1\n")  # version printed, `import venv` fails
    no_venv.chmod(0o755)
    proc = host.run([str(top / "install.sh"), "--prefix", str(prefix), "--no-systemd",
                     "--python", str(no_venv)], HOST_ENV)  # fmt: skip
    assert proc.returncode == 1
    assert f"{no_venv}: Python 3.11.2 without its venv module" in proc.stderr
    assert not (prefix / "opt/regproxy/current").exists()

    # a damaged archive is refused before anything is written
    with open(top / "README.md", "ab") as f:
        f.write(b"x")
    proc = host.run([str(top / "install.sh"), "--prefix", str(prefix), "--no-systemd"], HOST_ENV)
    assert proc.returncode == 1 and "the archive is damaged" in proc.stderr
    # nothing to roll back to on a fresh host
    proc = host.run([str(top / "install.sh"), "--rollback", "--prefix", str(prefix),
                     "--no-systemd"], HOST_ENV)  # fmt: skip
    assert proc.returncode == 1 and "nothing to roll back to" in proc.stderr
    assert not (prefix / "opt/regproxy/current").exists()
