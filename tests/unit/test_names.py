"""regproxy.names: every way a client names a repository resolves to one canonical name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from regproxy.config import config_from_dict
from regproxy.errors import NameInvalid
from regproxy.names import NameResolver, RepoName, normalize_host, split_reference


def resolver(**cfg: Any) -> NameResolver:
    return NameResolver(config_from_dict({"storage": {"root": str(Path("/nonexistent"))}, **cfg}))


NGINX = "spectro-images/docker.io/library/nginx"


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("spectro-images/docker.io/library/nginx", None),
        ("spectro-images/docker.io/nginx", None),
        ("spectro-images/index.docker.io/library/nginx", None),
        ("docker.io/library/nginx", None),
        ("docker.io/nginx", None),
        ("index.docker.io/nginx", None),
        ("registry-1.docker.io/library/nginx", None),
        ("library/nginx", "docker.io"),
        ("nginx", "docker.io"),
        ("library/nginx", "index.docker.io"),
        ("library/nginx", "registry-1.docker.io"),
        ("library/nginx", "Docker.IO"),
    ],
)
def test_docker_hub_forms(name: str, ns: str | None) -> None:
    r = resolver().resolve(name, ns)
    assert r == RepoName(NGINX, "docker.io", "library/nginx")
    assert not r.is_local
    assert str(r) == NGINX


def test_other_hosts() -> None:
    res = resolver()
    want = RepoName("spectro-images/ghcr.io/org/img", "ghcr.io", "org/img")
    assert res.resolve("ghcr.io/org/img") == want
    assert res.resolve("org/img", "ghcr.io") == want
    assert res.resolve("spectro-images/ghcr.io/org/img") == want
    # no library/ outside Docker Hub
    assert res.resolve("ghcr.io/img").path == "img"
    deep = res.resolve("spectro-images/us-docker.pkg.dev/org/repo/img")
    assert (deep.host, deep.path) == ("us-docker.pkg.dev", "org/repo/img")


def test_host_with_port() -> None:
    res = resolver()
    r = res.resolve("team/app", "10.0.0.5:5000")
    assert r == RepoName("spectro-images/10.0.0.5_5000/team/app", "10.0.0.5:5000", "team/app")
    # the _port form is how such a host appears inside a name, and it round-trips
    assert res.resolve("spectro-images/10.0.0.5_5000/team/app") == r
    assert res.resolve("10.0.0.5_5000/team/app") == r
    assert res.resolve("localhost_5000/x") == RepoName(
        "spectro-images/localhost_5000/x", "localhost:5000", "x"
    )
    assert res.resolve("localhost/x").host == "localhost"


def test_alias() -> None:
    res = resolver(upstreams={"10.0.0.5:5000": {"alias": "site"}})
    r = res.resolve("team/app", "10.0.0.5:5000")
    assert r.canonical == "spectro-images/site/team/app"
    assert r.host == "10.0.0.5:5000"
    assert res.resolve("spectro-images/site/team/app") == r
    assert res.resolve("site/team/app") == r


def test_local_only() -> None:
    res = resolver()
    assert res.resolve("spectro-images/myapp") == RepoName("spectro-images/myapp")
    assert res.resolve("spectro-images/myapp").is_local
    assert res.resolve("spectro-images/team/app") == RepoName("spectro-images/team/app")
    # a plain name without ns and without default_upstream is local under the project
    assert res.resolve("myapp") == RepoName("spectro-images/myapp")
    assert res.resolve("team/app") == RepoName("spectro-images/team/app")
    # the project alone is a local name too, not an upstream one
    assert res.resolve("spectro-images").is_local


def test_default_upstream() -> None:
    res = resolver(default_upstream="index.docker.io")
    assert res.resolve("nginx") == RepoName(NGINX, "docker.io", "library/nginx")
    assert res.resolve("library/nginx") == RepoName(NGINX, "docker.io", "library/nginx")
    # ns wins over the default, a host in the path wins too
    assert res.resolve("org/img", "ghcr.io").host == "ghcr.io"
    assert res.resolve("ghcr.io/org/img").host == "ghcr.io"
    # the project path stays local
    assert res.resolve("spectro-images/myapp").is_local


def test_project_from_config() -> None:
    res = resolver(content={"projects": {"images": "edge"}})
    assert res.resolve("docker.io/nginx").canonical == "edge/docker.io/library/nginx"
    assert res.resolve("edge/docker.io/nginx").canonical == "edge/docker.io/library/nginx"
    assert res.resolve("edge/myapp") == RepoName("edge/myapp")


@pytest.mark.parametrize(
    ("name", "ns"),
    [
        ("Nginx", None),
        ("a//b", None),
        ("/a", None),
        ("a/../b", None),
        ("..", None),
        ("a\n", None),
        ("x" * 256, None),
        ("docker.io/" + "a" * 240, None),  # fine alone, too long under the project
        ("nginx", "bad host"),
        ("nginx", "-x.io"),
        ("nginx", "a/b"),
        ("nginx", "x..io"),
        ("nginx", "host:port"),
        ("nginx", "docker.io\n"),
        ("Upper", "docker.io"),
    ],
)
def test_invalid(name: str, ns: str | None) -> None:
    with pytest.raises(NameInvalid):
        resolver().resolve(name, ns)


def test_host_component_round_trip() -> None:
    res = resolver(upstreams={"10.0.0.5:5000": {"alias": "site"}})
    for host in ("docker.io", "ghcr.io", "10.0.0.6:5000", "localhost:5000", "10.0.0.5:5000"):
        assert res.component_host(res.host_component(host)) == host
    assert res.component_host("library") is None
    assert res.component_host("myapp") is None


def test_normalize_host() -> None:
    assert normalize_host("INDEX.DOCKER.IO") == "docker.io"
    assert normalize_host("registry-1.docker.io") == "docker.io"
    assert normalize_host("GHCR.io") == "ghcr.io"


@pytest.mark.parametrize(
    ("ref", "name", "reference"),
    [
        ("nginx", "nginx", "latest"),
        ("nginx:1.25", "nginx", "1.25"),
        ("ghcr.io/o/i:v1", "ghcr.io/o/i", "v1"),
        ("localhost:5000/i", "localhost:5000/i", "latest"),
        ("localhost:5000/i:v2", "localhost:5000/i", "v2"),
        ("ghcr.io/o/i@sha256:" + "a" * 64, "ghcr.io/o/i", "sha256:" + "a" * 64),
        ("ghcr.io/o/i:v1@sha256:" + "a" * 64, "ghcr.io/o/i", "sha256:" + "a" * 64),
    ],
)
def test_split_reference(ref: str, name: str, reference: str) -> None:
    assert split_reference(ref) == (name, reference)


def test_parse_reference() -> None:
    res = resolver()
    assert res.parse_reference("nginx:1.25") == (
        RepoName(NGINX, "docker.io", "library/nginx"),
        "1.25",
    )
    name, ref = res.parse_reference("ghcr.io/o/i@sha256:" + "b" * 64)
    assert name.canonical == "spectro-images/ghcr.io/o/i" and ref == "sha256:" + "b" * 64
    assert res.parse_reference("spectro-images/myapp:v1") == (
        RepoName("spectro-images/myapp"),
        "v1",
    )
    name, _ = res.parse_reference("10.0.0.5:5000/team/app:v1")
    assert name == RepoName("spectro-images/10.0.0.5_5000/team/app", "10.0.0.5:5000", "team/app")
