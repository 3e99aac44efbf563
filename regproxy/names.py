"""The one namespace: every way a client names a repository resolves to one canonical name.

    <project>/<upstream-host>/<path>      e.g. spectro-images/docker.io/library/nginx
    <project>/<path>                      local-only (pushed or imported, never fetched)

A host with a port cannot be a name component (the grammar has no colon), so inside names
``host:port`` is written ``host_port`` (DNS names have no ``_``), unless the config gives the
upstream an ``alias``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from regproxy.config import Config
from regproxy.errors import NameInvalid
from regproxy.oci import validate_name

DOCKER_HUB: Final = "docker.io"
_DOCKER_ALIASES: Final = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_HOST_RE: Final = re.compile(
    r"^(?:localhost|\[[0-9a-f:]+\]|[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*)"
    r"(?::\d{1,5})?\Z"
)
_PORT_COMPONENT_RE: Final = re.compile(r"^(.+\.[a-z0-9-]+|localhost)_(\d{1,5})\Z")


@dataclass(frozen=True, slots=True)
class RepoName:
    """A resolved repository: its canonical name and, for upstream names, where it lives."""

    canonical: str
    #: registry host (``docker.io``, ``ghcr.io``, ``10.0.0.5:5000``), None for local-only names
    host: str | None = None
    #: the repository path at that host (``library/nginx``)
    path: str = ""

    @property
    def is_local(self) -> bool:
        return self.host is None

    def __str__(self) -> str:
        return self.canonical


def normalize_host(host: str) -> str:
    host = host.lower()
    if host in _DOCKER_ALIASES:
        return DOCKER_HUB
    return host


def _looks_like_host(component: str) -> bool:
    return "." in component or ":" in component or component == "localhost"


class NameResolver:
    """Maps request names to :class:`RepoName`, per the table in DESIGN.md."""

    def __init__(self, config: Config) -> None:
        self.project = config.project
        self.default_upstream = (
            normalize_host(config.default_upstream) if config.default_upstream else None
        )
        self._alias_to_host = {
            u.alias: u.pattern for u in config.upstreams if u.alias and "*" not in u.pattern
        }
        self._host_to_alias = {h: a for a, h in self._alias_to_host.items()}
        self._cache: dict[tuple[str, str | None], RepoName] = {}

    # host <-> name component
    def host_component(self, host: str) -> str:
        if host in self._host_to_alias:
            return self._host_to_alias[host]
        return host.replace(":", "_")

    def component_host(self, component: str) -> str | None:
        """The host a name component stands for, or None if it names no host."""
        if component in self._alias_to_host:
            return self._alias_to_host[component]
        m = _PORT_COMPONENT_RE.match(component)
        if m:
            return f"{m.group(1)}:{m.group(2)}"
        if _looks_like_host(component):
            return normalize_host(component)
        return None

    def upstream_name(self, host: str, path: str) -> RepoName:
        host = normalize_host(host)
        if not _HOST_RE.match(host):
            raise NameInvalid(host, "not a registry host name")
        validate_name(path)
        if host == DOCKER_HUB and "/" not in path:
            path = f"library/{path}"
        canonical = f"{self.project}/{self.host_component(host)}/{path}"
        validate_name(canonical)
        return RepoName(canonical, host, path)

    def resolve(self, name: str, ns: str | None = None) -> RepoName:
        """Resolve the ``<name>`` of a ``/v2/<name>/...`` request (and containerd's ``?ns=``).

        Pure for a given config, so valid answers are cached (every request resolves a name).
        """
        key = (name, ns)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        repo = self._resolve(name, ns)
        if len(self._cache) >= 16384:
            self._cache.clear()
        self._cache[key] = repo
        return repo

    def _resolve(self, name: str, ns: str | None) -> RepoName:
        validate_name(name)
        first, _, rest = name.partition("/")
        if first == self.project and rest:
            head, _, tail = rest.partition("/")
            host = self.component_host(head)
            if host is not None and tail:
                return self.upstream_name(host, tail)
            return RepoName(name)  # local-only: <project>/myapp
        if ns:
            return self.upstream_name(ns, name)
        if rest:
            host = self.component_host(first)
            if host is not None:
                return self.upstream_name(host, rest)
        if self.default_upstream:
            return self.upstream_name(self.default_upstream, name)
        return RepoName(f"{self.project}/{name}")

    def parse_reference(self, ref: str) -> tuple[RepoName, str]:
        """A full image reference (``nginx:1.25``, ``ghcr.io/o/i@sha256:...``) -> (name, tag|digest)."""
        name, reference = split_reference(ref)
        first, _, rest = name.partition("/")
        if rest and _looks_like_host(first):
            return self.upstream_name(first, rest), reference
        if first == self.project and rest:
            return self.resolve(name), reference
        return self.upstream_name(DOCKER_HUB, name), reference


def split_reference(ref: str) -> tuple[str, str]:
    """``host/name:tag@digest`` -> (``host/name``, digest or tag; ``latest`` when neither)."""
    name, at, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    tag = ""
    if ":" in last:
        name, tag = name.rsplit(":", 1)
    if at:
        return name.lower() if _is_lower_safe(name) else name, digest
    return name, tag or "latest"


def _is_lower_safe(name: str) -> bool:
    return name == name.lower()
