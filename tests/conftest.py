"""Fixtures that start real processes on loopback and always stop them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import Containerd, Daemon, DockerRegistry, have

needs_registry = pytest.mark.skipif(not have("docker-registry"), reason="docker-registry missing")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start regproxy daemons: ``daemon_factory({"content": {...}})``; stopped after the test."""
    started: list[Daemon] = []

    def make(
        config: dict[str, Any] | None = None,
        *,
        start: bool = True,
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Daemon:
        root = tmp_path / (name or f"regproxy{len(started)}")
        root.mkdir(parents=True, exist_ok=True)
        d = Daemon(root, config or {}, env=env or {})
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    return daemon_factory()


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., DockerRegistry]]:
    """Start Debian docker-registry instances; stopped after the test."""
    started: list[DockerRegistry] = []

    def make(**kwargs: Any) -> DockerRegistry:
        r = DockerRegistry(tmp_path / f"docker-registry{len(started)}", **kwargs)
        started.append(r)
        return r.start()

    yield make
    for r in started:
        r.stop()


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    c = Containerd(Path(f"/tmp/ctrd-{tmp_path.name[-12:]}"))  # short path: unix socket limit
    c.start()
    yield c
    c.stop()
    import shutil

    shutil.rmtree(c.root, ignore_errors=True)
