"""Fixtures that start real processes on loopback and always stop them; the fast/process marks."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from regproxy.deadline import Timing
from regproxy.log import LineHandler
from tests.fakes import FakeUpstream
from tests.inproc import AppDaemon
from tests.peers import Containerd, Daemon, DockerRegistry, have

needs_registry = pytest.mark.skipif(not have("docker-registry"), reason="docker-registry missing")


@pytest.fixture(autouse=True)
def root_logging() -> Iterator[None]:
    """A test that runs the command line in this process (``cli.main``) gets regproxy's log
    handler on the root logger, writing to that test's captured stderr, which pytest closes when
    the test ends: the handler goes with the test, and the root's level is put back. Left on,
    every line logged after (asyncio's at interpreter exit too) met a closed stream: a
    ``--- Logging error ---`` after the run's summary."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    yield
    for handler in root.handlers[:]:
        if isinstance(handler, LineHandler) and handler not in before:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


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
        nofile: int | None = None,
    ) -> Daemon:
        root = tmp_path / (name or f"regproxy{len(started)}")
        root.mkdir(parents=True, exist_ok=True)
        d = Daemon(root, config or {}, env=env or {}, nofile=nofile)
        started.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def app_factory(tmp_path: Path) -> Iterator[Callable[..., AppDaemon]]:
    """``daemon_factory`` in this process (tests/inproc.py): regproxy's app on a loop thread,
    for tests that talk to it as a client does; stopped after the test. ``timing=`` a fake clock."""
    started: list[AppDaemon] = []

    def make(
        config: dict[str, Any] | None = None,
        *,
        start: bool = True,
        name: str | None = None,
        timing: Timing | None = None,
    ) -> AppDaemon:
        root = tmp_path / (name or f"regproxy{len(started)}")
        root.mkdir(parents=True, exist_ok=True)
        d = AppDaemon(root, config or {}, timing=timing)
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


@pytest.fixture(scope="session")
def release_builds(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The offline release archive, built twice as it is and once as a newer version."""
    from tests.release import make_builds

    return make_builds(tmp_path_factory)


# --- the fast tier: ``python -m pytest -m fast`` runs every test that starts no subprocess -------
#: fixtures that start a process (a regproxy daemon, docker-registry, containerd); a test that
#: uses one of them, directly or through another fixture, is not fast
PROCESS_FIXTURES: Final = frozenset(
    {"daemon", "daemon_factory", "registry_factory", "containerd", "release_builds"}
)
#: audit events of starting a process (https://docs.python.org/3/library/audit_events.html)
_SPAWN_EVENTS: Final = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.system", "os.exec"}
)


class _SpawnWatch:
    """Which test is running, whether it is fast, and whether it started a process: itself,
    or through a fixture of a wider scope that it uses: a module's daemon, made in the setup of
    the module's first test or by a factory at its first call (the conformance suite's daemon
    per variant): the tests after it start none, and still need it."""

    def __init__(self) -> None:
        self.fast = False
        self.spawned: set[str] = set()
        self.current: str | None = None
        #: the running test's fixtures of a wider scope, defined by the tests themselves; and
        #: those that were in use when a process started (they may hold it)
        self.wide: tuple[object, ...] = ()
        self.spawning_fixtures: set[object] = set()

    def audit(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in _SPAWN_EVENTS or self.current is None:
            return
        self.spawned.add(self.current)
        self.spawning_fixtures.update(self.wide)
        if self.fast:
            raise RuntimeError(
                f"{self.current} is marked fast but started a process ({event} {args[:1]!r}): "
                "mark it `process` (pytest.mark.process), or test it in-process"
            )


def _wide_fixtures(item: pytest.Item) -> tuple[object, ...]:
    """The test's fixtures of a wider scope than a function that tests/ defines (not pytest's
    own: ``tmp_path_factory`` holds no process)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return ()
    return tuple(
        defs[-1]
        for defs in info.name2fixturedefs.values()
        if defs
        and defs[-1].scope != "function"
        and getattr(defs[-1].func, "__module__", "").startswith("tests.")
    )


_WATCH = _SpawnWatch()
sys.addaudithook(_WATCH.audit)


def _uses_process_fixture(item: pytest.Item) -> bool:
    """A fixture of PROCESS_FIXTURES as this file defines it (a test module may define one of
    the same name that serves the app in-process, tests/inproc.py: that one is fast)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    for name in PROCESS_FIXTURES & set(info.names_closure):
        defs = info.name2fixturedefs.get(name, ())
        if defs and getattr(defs[-1].func, "__module__", "") == __name__:
            return True
    return False


def is_process_test(item: pytest.Item) -> bool:
    return bool(
        _uses_process_fixture(item)
        or item.get_closest_marker("process")
        or item.get_closest_marker("peers")
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_process_test(item):
            item.add_marker(pytest.mark.process)
        else:
            item.add_marker(pytest.mark.fast)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _WATCH.current, _WATCH.fast = item.nodeid, item.get_closest_marker("fast") is not None
    _WATCH.wide = _wide_fixtures(item)
    try:
        return (yield)
    finally:
        _WATCH.current, _WATCH.fast, _WATCH.wide = None, False, ()


def _needs_a_process(item: pytest.Item) -> bool:
    """Whether the test started a process, or uses a fixture of a wider scope that was in use
    when one started."""
    if item.nodeid in _WATCH.spawned:
        return True
    return any(f in _WATCH.spawning_fixtures for f in _wide_fixtures(item))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Name the process tests that started no process (they belong in the fast tier)."""
    stats = terminalreporter.stats
    passed = {r.nodeid for r in stats.get("passed", []) if r.when == "call"}
    idle = sorted(
        n for n, item in _PROCESS_IDS.items() if n in passed and not _needs_a_process(item)
    )
    if idle:
        terminalreporter.write_line(
            f"{len(idle)} test(s) marked process started no process: " + " ".join(idle[:20])
        )


#: the process tests collected, by id
_PROCESS_IDS: dict[str, pytest.Item] = {}
#: where a run of fast tests only keeps its tmp_path directories: in RAM, where fsync costs
#: nothing (on a shared disk the fast tier's fsyncs were half its wall time)
RAM_TEMPROOT: Final = Path("/dev/shm")


def pytest_collection_finish(session: pytest.Session) -> None:
    _PROCESS_IDS.update((i.nodeid, i) for i in session.items if i.get_closest_marker("process"))
    if (
        session.items
        and not _PROCESS_IDS
        and session.config.option.basetemp is None
        and "PYTEST_DEBUG_TEMPROOT" not in os.environ
        and RAM_TEMPROOT.is_dir()
        and os.access(RAM_TEMPROOT, os.W_OK)
    ):
        # pytest creates the base temp dir at the first tmp_path, after collection; passing
        # tests' dirs are removed as they end (tmp_path_retention_policy in pyproject.toml)
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(RAM_TEMPROOT)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """A fake upstream registry of the tests' own on 127.0.0.1 (tests/fakes.py), in-process;
    a test module that needs a real one defines its own ``upstream``."""
    up = await FakeUpstream().start()
    yield up
    await up.stop()
