"""The cluster's other hosts: who they are, which are up, and the requests sent to them.

Peers speak the OCI API we already serve, with one of two marks (``Regproxy-Peer``):

- ``1``, a *lookup*: answered from the peer's local store only (committed content, never a
  transfer in flight), never forwarded;
- ``fetch``, sent only to a key's home host (regproxy.cluster): the peer answers from its store,
  from a transfer in flight, or from its own upstream through its single flight, never from
  another peer. A request is so never forwarded twice.

Every regproxy answers with ``Regproxy-Instance: <id>``. A host finds itself in the peer list by
its listen address (an entry whose port is the listen port and whose address is one of this
host's, so a DNS name that resolves to every node includes this one), else by that header on a
probe. The members of the cluster (for rendezvous hashing) are the peers that are up and this
host's own entry.

Liveness (regproxy.liveness): a peer that fails a probe or a request is set aside with an
exponential backoff (1 s at first, up to ``peers.refresh``) and probed again when it ends;
requests skip it meanwhile, so a dead peer costs one probe per interval, not a timeout per
request. A blob body that it cuts or stalls part-way is such a failure: the transfer goes on
from the next source at once (regproxy.fetch), without another attempt at this peer. A peer that sent wrong bytes is set aside for ``peers.refresh``; one that answered with
an error status is up (only its answer failed).

Bytes served to each peer (the web page's peers panel) are counted only for a request that
comes from a peer of the list: from one of its addresses (re-resolved with the list) and, where
several peers share an address (hosts on one machine), naming that peer's instance id in
``Regproxy-Instance`` (learnt from its probes). Anybody can send the marker: a request from
elsewhere, or one that names no peer, grows no figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import aiohttp
from yarl import URL

from regproxy.config import Config, UpstreamConfig
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.errors import BlobUnknown, UpstreamError
from regproxy.fetch import Source, Stream
from regproxy.headers import INSTANCE_HEADER, PEER_FETCH, PEER_HEADER, PEER_LOOKUP
from regproxy.liveness import Liveness
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.rendezvous import ranked
from regproxy.upstream import ManifestGet, ManifestHead, UpstreamClient
from regproxy.upstream.session import shared_session

log = logging.getLogger("regproxy.peers")
#: the first backoff of a peer that does not answer (doubling up to peers.refresh)
FIRST_BACKOFF: Final = 1.0
#: the probe loop wakes at least this often (a peer due sooner is probed sooner)
MAX_IDLE: Final = 5.0
T = TypeVar("T")
_FAILURES: Final = (TimeoutError, UpstreamError, OSError)
#: a peer that answered with one of these is up (its upstream failed, or its policy or login
#: refused): counted and logged, never set aside for it
_ANSWERED: Final = frozenset({"4xx", "429", "5xx", "auth"})


@dataclass
class Peer:
    url: str
    #: lookups: ``Regproxy-Peer: 1``
    client: UpstreamClient
    #: fetch requests to the home host: ``Regproxy-Peer: fetch``
    fetcher: UpstreamClient
    is_self: bool = False
    #: its addresses (the URL's host, resolved when the list is): where its requests come from
    addresses: frozenset[str] = frozenset()
    #: its ``Regproxy-Instance``, from its last probe
    instance: str | None = None


class Peers:
    def __init__(
        self,
        config: Config,
        instance_id: str,
        *,
        timing: Timing = DEFAULT_TIMING,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.config = config.peers
        self.listen = (config.listen_host, config.listen_port)
        self.instance_id = instance_id
        self.timing = timing
        cap = max(self.config.refresh, FIRST_BACKOFF)
        self.liveness = Liveness(
            timing.now, timing.random, first=FIRST_BACKOFF, cap=cap, every=self.config.refresh
        )
        self._peers: dict[str, Peer] = {}
        #: body bytes answered to each peer of the list (by url), for the web page
        self.served: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resolved_at = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.config.urls or self.config.dns)

    @property
    def home_hosts(self) -> bool:
        return self.config.home_hosts

    def _client(self, url: str, mark: str) -> UpstreamClient:
        cfg = UpstreamConfig(
            pattern=url,
            url=url,
            username=self.config.username,
            password=self.config.password,
            connect_timeout=self.config.timeout,
            read_timeout=max(self.config.timeout * 5, 10.0),
        )
        assert self._session is not None
        return UpstreamClient(
            url,
            cfg,
            self._session,
            extra_headers={PEER_HEADER: mark, INSTANCE_HEADER: self.instance_id},
            timing=self.timing,
            meters=self.metrics.peer_meters,
        )

    # --- membership ------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled:
            return
        self._session = shared_session(limit_per_host=32)
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="peers")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            due = self.liveness.next_due()
            now = self.timing.now()
            wait = MAX_IDLE if due is None else min(MAX_IDLE, max(due - now, 0.05))
            await asyncio.sleep(wait)
            try:
                if self.timing.now() - self._resolved_at >= self.config.refresh:
                    await self.refresh()
                else:
                    await self.probe_due()
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
        """Re-resolve the peer list, find this host's own entry, and probe what is due."""
        urls = await self._resolve()
        self._resolved_at = self.timing.now()
        for url in list(self._peers):
            if url not in urls:
                self._peers.pop(url)
                self.served.pop(url, None)
        for url in urls:
            if url not in self._peers:
                peer = Peer(url, self._client(url, PEER_LOOKUP), self._client(url, PEER_FETCH))
                peer.is_self = await self._is_own_address(url)
                if peer.is_self:
                    log.info("peers.self url=%s", url)
                self._peers[url] = peer
            self._peers[url].addresses = await _addresses(url)
        self.liveness.keep(p.url for p in self._peers.values() if not p.is_self)
        await self.probe_due()

    async def _is_own_address(self, url: str) -> bool:
        """The entry names this host: its port is ours and its address one of this host's
        (an address we can bind is local), and we listen on it."""
        u = URL(url)
        host, port = u.host or "", u.port
        listen_host, listen_port = self.listen
        if port != listen_port or not host:
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
        except OSError:
            return False
        for family, _, _, _, sockaddr in infos:
            addr = str(sockaddr[0])
            if listen_host not in ("", "0.0.0.0", "::") and not _same_ip(addr, listen_host):
                continue
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((addr, 0))
                except OSError:
                    continue
                return True
        return False

    async def probe_due(self) -> None:
        """Probe the peers whose probe is due (a set-aside peer when its backoff ends)."""
        due = set(self.liveness.due())
        peers = [p for p in self._peers.values() if p.url in due and not p.is_self]
        await asyncio.gather(*(self._probe(p) for p in peers))
        self._export()

    async def _probe(self, peer: Peer) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"{peer.url}/healthz",
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                headers={PEER_HEADER: PEER_LOOKUP},
            ) as resp:
                if resp.headers.get(INSTANCE_HEADER) == self.instance_id:
                    peer.is_self = True
                    log.info("peers.self url=%s", peer.url)
                    self.liveness.keep(p.url for p in self._peers.values() if not p.is_self)
                    return
                if resp.status >= 500:
                    raise UpstreamError(peer.url, f"/healthz answered {resp.status}")
                peer.instance = resp.headers.get(INSTANCE_HEADER) or peer.instance
        except (TimeoutError, aiohttp.ClientError, OSError, UpstreamError) as exc:
            state = self.liveness.state(peer.url)
            was_up = state.up or not state.known
            wait = self.liveness.failed(peer.url, str(exc) or type(exc).__name__)
            log.log(
                logging.INFO if was_up else logging.DEBUG,
                "peers.unreachable url=%s error=%s next_probe_s=%.1f",
                peer.url,
                exc,
                wait,
            )
            return
        if not self.liveness.is_up(peer.url):
            log.info("peers.up url=%s", peer.url)
        self.liveness.ok(peer.url)

    def _export(self) -> None:
        up, down = self.liveness.counts()
        self.metrics.peers.labels("up").set(up)
        self.metrics.peers.labels("down").set(down)

    @property
    def own(self) -> Peer | None:
        """This host's own entry in the peer list, once known."""
        return next((p for p in self._peers.values() if p.is_self), None)

    def known(self) -> list[Peer]:
        """Every peer of the current list, this host's own entry included (for the web page)."""
        return list(self._peers.values())

    def usable(self) -> list[Peer]:
        """The other hosts that are up, in the order of the peer list."""
        return [p for p in self._peers.values() if not p.is_self and self.liveness.is_up(p.url)]

    def asking(self, remote: str | None, instance: str | None) -> Peer | None:
        """The peer of the list a peer-marked request came from, or None (anybody may send the
        marker): the one whose address it came from, or among several on that address, the
        one whose instance id it names."""
        ip = _ip(remote or "")
        if ip is None:
            return None
        found = [p for p in self._peers.values() if not p.is_self and ip in p.addresses]
        if len(found) > 1:
            found = [p for p in found if p.instance is not None and p.instance == instance]
        return found[0] if len(found) == 1 else None

    def served_to(self, peer: Peer, n: int) -> None:
        """Body bytes answered to a peer of the list."""
        if n > 0 and peer.url in self._peers:
            self.served[peer.url] = self.served.get(peer.url, 0) + n
            self.metrics.peer_served_bytes.labels(peer.url).inc(n)

    def order(self, key: str) -> list[Peer]:
        """The members (the peers that are up, and this host's entry) in the key's rendezvous
        order: the first is the key's home."""
        members = self.usable()
        own = self.own
        if own is not None:
            members.append(own)
        return ranked(members, [p.url for p in members], key)

    def failed(self, peer: Peer, what: str, exc: Exception, *, hold: bool = False) -> None:
        """A request to the peer failed: set it aside unless it answered (an error status is an
        answer: the peer is up); ``hold``: for the longest backoff (it sent wrong bytes)."""
        self.metrics.peer_request(peer.url, "error")
        if isinstance(exc, UpstreamError) and exc.kind in _ANSWERED and not hold:
            # a refused login is the operator's to fix (peers.username/password)
            level = logging.WARNING if exc.kind == "auth" else logging.INFO
            log.log(level, "peers.refused url=%s what=%s error=%s", peer.url, what, exc)
            return
        wait = self.liveness.failed(
            peer.url, str(exc) or type(exc).__name__, hold=self.liveness.cap if hold else None
        )
        self._export()
        log.warning(
            "peers.failed url=%s what=%s error=%s next_probe_s=%.1f",
            peer.url,
            what,
            exc,
            wait,
        )

    # --- requests --------------------------------------------------------------------------------
    async def ask(
        self,
        peers: Sequence[Peer],
        op: Callable[[Peer], Awaitable[T | None]],
        what: str,
        *,
        within: float | None = None,
    ) -> list[tuple[Peer, T]]:
        """Ask the peers at once (each within ``within`` seconds): those that have it, in the
        order given. A peer that fails is set aside."""
        if not peers:
            return []
        results: list[T | None] = [None] * len(peers)

        async def one(i: int, p: Peer) -> None:
            try:
                async with asyncio.timeout(within):
                    results[i] = await op(p)
            except BlobUnknown:
                results[i] = None
            except _FAILURES as exc:
                self.failed(p, what, exc)
                return
            self.metrics.peer_request(p.url, "miss" if results[i] is None else "hit")

        await asyncio.gather(*(one(i, p) for i, p in enumerate(peers)))
        return [(p, r) for p, r in zip(peers, results, strict=True) if r is not None]

    async def first(
        self, peers: Sequence[Peer], op: Callable[[Peer], Awaitable[T | None]], what: str
    ) -> tuple[Peer, T] | None:
        """Ask the peers one after another (fetch requests to home hosts): the first answer."""
        for p in peers:
            found = await self.ask([p], op, what)
            if found:
                return found[0]
        return None

    async def blob_holders(
        self, peers: Sequence[Peer], repo: str, digest: Digest
    ) -> list[tuple[Peer, int]]:
        """The peers (of those given) that hold the blob committed, and its size: a HEAD
        lookup to each at once within ``peers.timeout``."""

        async def head(p: Peer) -> int | None:
            size = await p.client.head_blob(repo, digest)
            return None if size is None or size < 0 else size

        return await self.ask(peers, head, f"HEAD {repo}@{digest}", within=self.config.timeout)

    def blob_source(self, peer: Peer, repo: str, *, fetch: bool) -> Source:
        """The peer as a transfer source: a lookup of what it holds, or (``fetch``) a fetch
        request to it as the home host."""
        client = peer.fetcher if fetch else peer.client

        async def open_blob(digest: Digest, offset: int) -> Stream:
            try:
                return await client.open_blob(repo, digest, offset)
            except BlobUnknown:
                self.metrics.peer_request(peer.url, "miss")
                raise
            except UpstreamError as exc:
                self.failed(peer, f"GET {repo}@{digest}", exc)
                raise

        def bad() -> None:
            self.failed(
                peer,
                f"{repo} blob",
                UpstreamError(peer.url, "sent wrong bytes", kind="digest_mismatch"),
                hold=True,
            )

        def cut(digest: Digest, exc: UpstreamError) -> None:
            self.failed(peer, f"GET {repo}@{digest} body", exc)

        return Source(
            peer.url,
            "home" if fetch else "peer",
            open_blob,
            bad,
            on_cut=cut,
            usable=lambda: self.liveness.is_up(peer.url),
        )

    def manifest_op(
        self, repo: str, reference: str, *, fetch: bool
    ) -> Callable[[Peer], Awaitable[ManifestGet | None]]:
        async def get(p: Peer) -> ManifestGet | None:
            return await (p.fetcher if fetch else p.client).get_manifest(repo, reference)

        return get

    def head_op(self, repo: str, tag: str) -> Callable[[Peer], Awaitable[ManifestHead | None]]:
        """A fetch request HEAD for a tag: the home host confirms it (upstream, if due)."""

        async def head(p: Peer) -> ManifestHead | None:
            return await p.fetcher.head_manifest(repo, tag)

        return head

    async def referrers(self, repo: str, digest: Digest) -> list[bytes]:
        """Every peer's referrers index for a manifest (each from its local store)."""

        async def get(p: Peer) -> bytes | None:
            return await p.client.get_referrers(repo, digest)

        found = await self.ask(
            self.usable(), get, f"referrers {repo}@{digest}", within=self.config.timeout
        )
        return [body for _peer, body in found]

    # --- what the web page shows -------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for p in self._peers.values():
            if p.is_self:
                out.append({"url": p.url, "state": "self"})
            else:
                out.append({"url": p.url, **self.liveness.to_json(p.url)})
        return out


def _ip(addr: str) -> str | None:
    """An address as one spelling (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def _addresses(url: str) -> frozenset[str]:
    """The addresses a peer's URL names (its host resolved, unless an address already)."""
    host = URL(url).host or ""
    ip = _ip(host)
    if ip is not None:
        return frozenset({ip})
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(a for a in (_ip(str(i[4][0])) for i in infos) if a is not None)


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b
