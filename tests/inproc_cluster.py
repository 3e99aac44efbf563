"""A cluster of regproxy apps in one event loop, for the fast tier.

Each host is a ``create_app`` on a port of its own, behind a small TCP relay of the tests' own:
the peer list names the relays, so a test can take a host off the network at once (``kill``:
the relay stops listening and cuts every connection through it), as a host that dies does.
All hosts share one fake clock (monotonic and wall), so a test moves time past ``tag_ttl`` or
a backoff instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.deadline import Timing
from regproxy.peers import Peers
from regproxy.proxy import ProxyRegistry
from regproxy.web_keys import REGISTRY_KEY
from tests.fakes import FakeUpstream

ALIAS = "fake.test"
PROJECT = "spectro-images"


@dataclass
class Clock:
    mono: float = 1000.0
    wall: float = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def timing(self) -> Timing:
        async def no_wait(seconds: float) -> None:
            await asyncio.sleep(0)

        return Timing(
            now=lambda: self.mono, sleep=no_wait, random=lambda: 0.5, wall=lambda: self.wall
        )


class Relay:
    """A TCP relay in front of one host: ``kill`` takes the host off the network."""

    def __init__(self) -> None:
        self.target = 0
        self.port = 0
        self.alive = True
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if not self.alive or not self.target:
            writer.transport.abort()
            return
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, w2))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, RuntimeError):
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, w2), pipe(r2, writer))
        finally:
            for w in (writer, w2):
                self._writers.discard(w)
                w.transport.abort()

    def kill(self) -> None:
        self.alive = False
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.transport.abort()

    async def stop(self) -> None:
        self.kill()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


@dataclass
class Host:
    name: str
    relay: Relay
    server: TestServer | None = None

    @property
    def url(self) -> str:
        """How clients and peers reach it (through its relay)."""
        return self.relay.url

    @property
    def app(self) -> web.Application:
        assert self.server is not None
        return self.server.app

    @property
    def registry(self) -> ProxyRegistry:
        reg = self.app[REGISTRY_KEY]
        assert isinstance(reg, ProxyRegistry)
        return reg

    @property
    def peers(self) -> Peers:
        assert self.registry.peers is not None
        return self.registry.peers


@dataclass
class Cluster:
    hosts: list[Host]
    clock: Clock
    upstream: FakeUpstream
    session: aiohttp.ClientSession
    extra: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    async def probe_all(self) -> None:
        """Every host probes every peer now (after their backoff: the clock moves past it)."""
        self.clock.advance(60.0)
        for h in self.hosts:
            if h.server is not None and h.relay.alive:
                await h.peers.probe_due()

    def blob_url(self, host: Host, digest: str, repo: str = "app") -> str:
        return f"{host.url}/v2/{ALIAS}/{repo}/blobs/{digest}"

    def manifest_url(self, host: Host, ref: str, repo: str = "app") -> str:
        return f"{host.url}/v2/{ALIAS}/{repo}/manifests/{ref}"

    async def get(self, url: str, **kw: Any) -> tuple[int, bytes, dict[str, str]]:
        async with self.session.get(url, **kw) as r:
            return r.status, await r.read(), dict(r.headers)


@contextlib.asynccontextmanager
async def cluster(
    root: Path,
    n: int,
    *,
    sync: list[bool] | None = None,
    peers: dict[str, Any] | None = None,
    upstream: FakeUpstream | None = None,
    extra_peers: tuple[str, ...] = (),
    urls_for: Callable[[int, list[str]], list[str]] | None = None,
    **extra: Any,
) -> AsyncIterator[Cluster]:
    """``n`` hosts that list each other (through their relays) and ``extra_peers``, one
    FakeUpstream above them. ``urls_for(i, urls)``: host i's own peer list instead."""
    up = upstream or await FakeUpstream().start()
    clock = Clock()
    relays = [await Relay().start() for _ in range(n)]
    hosts = [Host(f"h{i}", relays[i]) for i in range(n)]
    session = aiohttp.ClientSession()
    c = Cluster(hosts, clock, up, session)
    try:
        for i, h in enumerate(hosts):
            raw: dict[str, Any] = {
                # the relay's address is the one peers know: the host finds itself by it
                "listen": f"127.0.0.1:{h.relay.port}",
                "storage": {"root": str(root / h.name)},
                "log": {"access": False},
                "tag_ttl": "60s",
                "content": {"sync": {"enable": True if sync is None else sync[i]}},
                "upstreams": {up.hostport: {"url": up.url, "alias": ALIAS}},
                "peers": {
                    "urls": (urls_for or (lambda _i, u: u))(
                        i, [r.url for r in relays] + list(extra_peers)
                    ),
                    "timeout": "2s",
                    "refresh": "30s",
                    **(peers or {}),
                },
                **extra,
            }
            app = create_app(config_from_dict(raw), timing=clock.timing())
            h.server = TestServer(app, host="127.0.0.1")
            await h.server.start_server()
            assert h.server.port is not None
            h.relay.target = h.server.port
        await c.probe_all()
        if urls_for is None:
            for h in hosts:
                others = [o.url for o in hosts if o is not h] + list(extra_peers)
                assert [p.url for p in h.peers.usable()] == others
                assert h.peers.own is not None and h.peers.own.url == h.url
        yield c
    finally:
        await session.close()
        for h in hosts:
            await h.relay.stop()
            if h.server is not None:
                with contextlib.suppress(Exception):
                    await h.server.close()
        if upstream is None:
            await up.stop()
