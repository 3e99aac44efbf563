"""``regproxy containerd-config``: containerd ``hosts.toml`` files that put regproxy first.

For every configured upstream that is one concrete host (``docker.io``, ``ghcr.io``,
``10.0.0.5:5000``; not ``*.pkg.dev`` or ``*``, which name no directory containerd looks up) it
writes ``DIR/<host>/hosts.toml``::

    server = "https://registry-1.docker.io"      # the real registry: used when regproxy fails

    [host."http://127.0.0.1:30003"]                # regproxy, tried first; containerd adds ?ns=
      capabilities = ["pull", "resolve"]

and, when asked, ``DIR/_default/hosts.toml`` (every other registry: regproxy first, then the
registry itself). A file it replaces is kept beside it as ``hosts.toml.bak-<UTC time>``; a file
that already says the same is left alone, so a second run changes nothing.
See https://github.com/containerd/containerd/blob/main/docs/hosts.md.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from regproxy.config import Config
from regproxy.names import DOCKER_HUB, normalize_host

DEFAULT_DIR: Final = "/etc/containerd/certs.d"
DEFAULT_NAMESPACE: Final = "_default"
#: containerd's own example: docker.io's registry API is served by registry-1.docker.io
DOCKER_HUB_SERVER: Final = "https://registry-1.docker.io"
HEADER: Final = (
    "# Written by `regproxy containerd-config`: regproxy first, the registry if it fails.\n"
)


@dataclass(frozen=True, slots=True)
class HostsFile:
    namespace: str  # the directory name: a registry host, or _default
    text: str


@dataclass(frozen=True, slots=True)
class Change:
    path: Path
    action: str  # created | replaced | unchanged
    backup: Path | None = None


def default_url(config: Config) -> str:
    """regproxy as containerd on this host reaches it."""
    scheme = "https" if config.tls.enabled else "http"
    host = config.listen_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{config.listen_port}"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(server: str | None, mirror: str, ca: str | None = None) -> str:
    lines = [HEADER.rstrip("\n")]
    if server:
        lines += [f"server = {_quote(server)}", ""]
    lines += [f"[host.{_quote(mirror)}]", '  capabilities = ["pull", "resolve"]']
    if ca:
        lines.append(f"  ca = {_quote(ca)}")
    return "\n".join(lines) + "\n"


def is_concrete(pattern: str) -> bool:
    return not any(c in pattern for c in "*?[")


def plan(
    config: Config, mirror: str, *, default: bool = False, ca: str | None = None
) -> tuple[list[HostsFile], list[str]]:
    """The files to write, and the upstream entries skipped (patterns) for the report."""
    mirror = mirror.rstrip("/")
    files: dict[str, HostsFile] = {}
    skipped: list[str] = []
    for up in config.upstreams:
        if not is_concrete(up.pattern):
            skipped.append(up.pattern)
            continue
        host = normalize_host(up.pattern)
        if host in files:
            continue
        # docker.io's API is not at https://docker.io: use the host containerd's docs name
        hub = host == DOCKER_HUB and not up.url
        server = DOCKER_HUB_SERVER if hub else up.url_for(up.pattern)
        files[host] = HostsFile(host, render(server, mirror, ca))
    if default:
        # no server: containerd then falls back to the image's own registry
        files[DEFAULT_NAMESPACE] = HostsFile(DEFAULT_NAMESPACE, render(None, mirror, ca))
    return list(files.values()), skipped


def _backup_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate = path.with_name(f"{path.name}.bak-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.bak-{stamp}.{n}")
        n += 1
    return candidate


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.regproxy-tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def apply(files: list[HostsFile], directory: Path, *, dry_run: bool = False) -> list[Change]:
    changes = []
    for f in files:
        path = directory / f.namespace / "hosts.toml"
        try:
            old: str | None = path.read_text()
        except FileNotFoundError:
            old = None
        if old == f.text:
            changes.append(Change(path, "unchanged"))
            continue
        backup = _backup_path(path) if old is not None else None
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            if backup is not None:
                shutil.copy2(path, backup)
            _write_atomic(path, f.text)
        changes.append(Change(path, "created" if old is None else "replaced", backup))
    return changes
