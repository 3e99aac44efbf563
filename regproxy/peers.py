"""The cluster's other hosts, asked by digest before any upstream.

Peers speak the OCI API we already serve. A request to a peer carries ``Regproxy-Peer: 1``;
a peer answers such a request from its local store only, so a miss never circles. Every
regproxy answers with ``Regproxy-Instance: <id>``, which is how a host recognises itself in a
peer list (a DNS name that resolves to every node includes this one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, TypeVar

import aiohttp

from regproxy import metrics
from regproxy.config import Config, UpstreamConfig
from regproxy.errors import BlobUnknown, UpstreamError
from regproxy.fetch import Source, Stream
from regproxy.headers import INSTANCE_HEADER, PEER_HEADER
from regproxy.oci import Digest
from regproxy.upstream import ManifestGet, UpstreamClient
from regproxy.upstream.session import shared_session

log = logging.getLogger("regproxy.peers")
BACKOFF_SECONDS: Final = 30.0
T = TypeVar("T")


@dataclass
class Peer:
    url: str
    client: UpstreamClient
    bad_until: float = 0.0
    is_self: bool = False
    checked: float = field(default=0.0)

    @property
    def usable(self) -> bool:
        return not self.is_self and time.monotonic() >= self.bad_until


class Peers:
    def __init__(self, config: Config, instance_id: str) -> None:
        self.config = config.peers
        self.instance_id = instance_id
        self._peers: dict[str, Peer] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.config.urls or self.config.dns)

    def _client(self, url: str) -> UpstreamClient:
        cfg = UpstreamConfig(
            pattern=url,
            url=url,
            username=self.config.username,
            password=self.config.password,
            connect_timeout=self.config.timeout,
            read_timeout=max(self.config.timeout * 5, 10.0),
        )
        assert self._session is not None
        return UpstreamClient(url, cfg, self._session, extra_headers={PEER_HEADER: "1"})

    async def start(self) -> None:
        if not self.enabled:
            return
        self._session = shared_session(limit_per_host=16)
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh)
            try:
                await self.refresh()
            except Exception:
                log.exception("peers.refresh_failed")

    async def _resolve(self) -> list[str]:
        urls = [u.rstrip("/") for u in self.config.urls]
        if self.config.dns:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    self.config.dns, self.config.port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                log.warning("peers.dns_failed name=%s error=%s", self.config.dns, exc)
                infos = []
            for info in infos:
                addr = str(info[4][0])
                host = f"[{addr}]" if ":" in addr else addr
                urls.append(f"{self.config.scheme}://{host}:{self.config.port}")
        return list(dict.fromkeys(urls))

    async def refresh(self) -> None:
        """Re-resolve the peer list and find out which entry is this host."""
        urls = await self._resolve()
        for url in list(self._peers):
            if url not in urls:
                self._peers.pop(url)
        for url in urls:
            if url not in self._peers:
                self._peers[url] = Peer(url, self._client(url))
        await asyncio.gather(*(self._probe(p) for p in self._peers.values()))

    async def _probe(self, peer: Peer) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{peer.url}/healthz",
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                headers={PEER_HEADER: "1"},
            ) as resp:
                peer.is_self = resp.headers.get(INSTANCE_HEADER) == self.instance_id
                peer.checked = time.monotonic()
                if peer.is_self:
                    log.debug("peers.self url=%s", peer.url)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("peers.unreachable url=%s error=%s", peer.url, exc)
            peer.bad_until = time.monotonic() + min(BACKOFF_SECONDS, self.config.refresh)

    def usable(self) -> list[Peer]:
        return [p for p in self._peers.values() if p.usable]

    def known(self) -> list[Peer]:
        """Every peer of the current list, this host's own entry included (for the web page)."""
        return list(self._peers.values())

    def _failed(self, peer: Peer, what: str, exc: Exception) -> None:
        peer.bad_until = time.monotonic() + BACKOFF_SECONDS
        metrics.PEER_REQUESTS.labels(peer.url, "error").inc()
        log.warning(
            "peers.failed url=%s what=%s error=%s backoff_s=%.0f",
            peer.url,
            what,
            exc,
            BACKOFF_SECONDS,
        )

    async def _ask_all(
        self, op: Callable[[Peer], Awaitable[T | None]], what: str
    ) -> list[tuple[Peer, T]]:
        """Ask every usable peer at once, within the timeout; those that have it, fastest first."""
        peers = self.usable()
        if not peers:
            return []
        found: list[tuple[Peer, T]] = []

        async def one(p: Peer) -> None:
            try:
                result = await asyncio.wait_for(op(p), self.config.timeout)
            except (TimeoutError, UpstreamError, OSError) as exc:
                self._failed(p, what, exc)
                return
            if result is None:
                metrics.PEER_REQUESTS.labels(p.url, "miss").inc()
            else:
                metrics.PEER_REQUESTS.labels(p.url, "hit").inc()
                found.append((p, result))

        await asyncio.gather(*(one(p) for p in peers))
        return found

    async def blob_sources(self, repo: str, digest: Digest) -> list[Source]:
        """A source per peer that holds the blob (a parallel HEAD to each), fastest first."""

        async def head(p: Peer) -> int | None:
            return await p.client.head_blob(repo, digest)

        sources = []
        for peer, _size in await self._ask_all(head, f"HEAD {repo}@{digest}"):
            sources.append(self._source(peer, repo))
        return sources

    async def blob_size(self, repo: str, digest: Digest) -> int | None:
        """The size the first peer that holds the blob answers a HEAD with, or None."""

        async def head(p: Peer) -> int | None:
            size = await p.client.head_blob(repo, digest)
            return None if size is None or size < 0 else size

        found = await self._ask_all(head, f"HEAD {repo}@{digest}")
        return found[0][1] if found else None

    def _source(self, peer: Peer, repo: str) -> Source:
        async def open_blob(digest: Digest, offset: int) -> Stream:
            try:
                return await peer.client.open_blob(repo, digest, offset)
            except BlobUnknown:
                raise
            except UpstreamError as exc:
                self._failed(peer, f"GET {repo}@{digest}", exc)
                raise

        def bad() -> None:
            self._failed(
                peer,
                f"{repo} blob",
                UpstreamError(peer.url, "sent wrong bytes", kind="digest_mismatch"),
            )

        return Source(peer.url, "peer", open_blob, bad)

    async def manifest(self, repo: str, reference: str) -> tuple[str, ManifestGet] | None:
        """The first peer's answer for a manifest (by tag or digest); the caller verifies."""
        if not self.usable():
            return None

        async def get(p: Peer) -> ManifestGet | None:
            return await p.client.get_manifest(repo, reference)

        found = await self._ask_all(get, f"GET {repo}:{reference}")
        if not found:
            return None
        peer, got = found[0]
        return peer.url, got

    async def referrers(self, repo: str, digest: Digest) -> list[bytes]:
        """Every usable peer's referrers index for a manifest (each from its local store)."""
        if not self.usable():
            return []

        async def get(p: Peer) -> bytes | None:
            return await p.client.get_referrers(repo, digest)

        return [body for _peer, body in await self._ask_all(get, f"referrers {repo}@{digest}")]
