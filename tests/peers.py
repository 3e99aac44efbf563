"""Real processes for tests: regproxy daemons, Debian's docker-registry, containerd; skopeo/ctr.

Every process binds 127.0.0.1 on a free port and is stopped by PID by whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.images import Image, write_layout

REPO_ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: between closing it here and the server binding it,
    any outgoing connection (a client of another test) may take it as its local port, and the
    server fails with EADDRINUSE. Below the range no outgoing connection ever lands.
    """
    high = min(_ephemeral_low(), 65536)
    for _ in range(200):
        port = random.randrange(max(high - 12000, 1024), high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            # https: readiness only, the certificate is the test's own business
            ctx = ssl._create_unverified_context() if url.startswith("https:") else None
            with urllib.request.urlopen(url, timeout=1, context=ctx):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 and friends are answers)
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Daemon:
    """A ``regproxy serve`` subprocess."""

    root: Path
    config: dict[str, Any]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    env: dict[str, str] = field(default_factory=dict)
    #: RLIMIT_NOFILE (soft and hard) of the daemon process, as ``ulimit -n`` would set it
    nofile: int | None = None

    def __post_init__(self) -> None:
        self.log_path = self.root / "regproxy.log"

    @property
    def url(self) -> str:
        scheme = "https" if self.config.get("tls") else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Daemon:
        if not self.port:
            self.port = free_port()
        cfg = dict(self.config)
        cfg["listen"] = f"127.0.0.1:{self.port}"
        cfg.setdefault("storage", {})
        cfg["storage"] = {"root": str(self.root / "store"), **cfg["storage"]}
        cfg.setdefault("shutdown_timeout", "5s")
        path = self.root / "regproxy.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None) if "NOTIFY_SOCKET" not in self.env else None
        logf = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        nofile = self.nofile

        def limit() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "regproxy", "--config", str(path), "serve"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_ROOT),
            preexec_fn=limit if nofile is not None else None,
        )
        logf.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        try:
            wait_http(f"{self.url}/healthz", proc=self.proc)
        except Exception:
            print(self.log())
            raise

    def stop(self) -> int | None:
        if self.proc is not None:
            stop_process(self.proc)
            return self.proc.returncode
        return None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class DockerRegistry:
    """Debian's docker-registry (CNCF distribution 2.8) on loopback."""

    root: Path
    port: int = 0
    htpasswd: Path | None = None
    proxy_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    #: (certificate, key): serve HTTPS
    tls: tuple[Path, Path] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DockerRegistry:
        if not self.port:
            self.port = free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if self.tls is not None:
            cfg["http"]["tls"] = {"certificate": str(self.tls[0]), "key": str(self.tls[1])}
        if self.htpasswd is not None:
            cfg["auth"] = {"htpasswd": {"realm": "test", "path": str(self.htpasswd)}}
        if self.proxy_url:
            cfg["proxy"] = {"remoteurl": self.proxy_url}
        cfg.update(self.extra)
        path = self.root / "config.yml"
        path.write_text(yaml.safe_dump(cfg))
        logf = open(self.root / "registry.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(path)], stdout=logf, stderr=subprocess.STDOUT
        )
        logf.close()
        wait_http(f"{self.url}/v2/", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log(self) -> str:
        p = self.root / "registry.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def requests(self, method: str, fragment: str) -> int:
        """Count access-log lines for a method and a path fragment (e.g. '/blobs/sha256:..')."""
        n = 0
        for line in self.log().splitlines():
            if f'"{method} ' in line and fragment in line:
                n += 1
        return n


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    out = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    path.write_text(out.strip() + "\n")
    return path


def skopeo(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["skopeo", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def push_image(img: Image, layout: Path, dest: str, *copy_args: str) -> None:
    """Write ``img`` as tag v1 of an OCI layout at ``layout`` and skopeo copy it to
    ``docker://{dest}`` over plain HTTP; ``copy_args``: more flags (``--dest-creds``, ...)."""
    write_layout(layout, {"v1": img})
    skopeo("copy", "--dest-tls-verify=false", *copy_args, f"oci:{layout}:v1", f"docker://{dest}")


def skopeo_raw(ref: str) -> bytes:
    proc = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return proc.stdout


@dataclass
class Containerd:
    """A containerd of the test's own (no CRI, native snapshotter), and ``ctr`` against it."""

    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return str(self.root / "containerd.sock")

    def start(self) -> Containerd:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "config.toml"
        cfg.write_text(
            "\n".join(
                [
                    "version = 2",
                    f'root = "{self.root}/root"',
                    f'state = "{self.root}/state"',
                    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
                    "[grpc]",
                    f'  address = "{self.address}"',
                    "[ttrpc]",
                    f'  address = "{self.root}/containerd.ttrpc.sock"',
                    "[debug]",
                    f'  address = "{self.root}/debug.sock"',
                ]
            )
            + "\n"
        )
        logf = open(self.root / "containerd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(cfg)], stdout=logf, stderr=subprocess.STDOUT
        )
        logf.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    "containerd exited: " + (self.root / "containerd.log").read_text()
                )
            if self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        raise TimeoutError("containerd did not start")

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["ctr", "--address", self.address, "-n", "test", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def pull(
        self, hosts_dir: Path, ref: str, *extra: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``ctr images pull`` through the mirrors in ``hosts_dir``, unpacked natively."""
        return self.ctr(
            "images",
            "pull",
            "--plain-http",
            "--hosts-dir",
            str(hosts_dir),
            "--snapshotter",
            "native",
            *extra,
            ref,
            check=check,
        )

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


def write_hosts_toml(
    hosts_dir: Path, registry_host: str, mirror: str, server: str | None = None
) -> Path:
    """A containerd ``hosts.toml`` that makes ``mirror`` the only working host for registry_host.

    ``server`` defaults to a loopback port where nothing listens, so a broken mirror cannot
    silently fall back to the real registry.
    """
    d = hosts_dir / registry_host
    d.mkdir(parents=True, exist_ok=True)
    server = server or f"http://127.0.0.1:{free_port()}"
    (d / "hosts.toml").write_text(
        f'server = "{server}"\n\n[host."{mirror}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    return d / "hosts.toml"


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@contextlib.contextmanager
def started(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for t in reversed(things):
            with contextlib.suppress(Exception):
                t.stop()


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request (urllib), returning status, headers and body even for 4xx/5xx."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def error_codes(body: bytes) -> list[str]:
    return [e["code"] for e in json.loads(body)["errors"]]
