"""What a miss asks of the cluster, and in which order (DESIGN.md, "Home hosts").

Every digest and every ``<repo>:<tag>`` has a **home host**: the first of the cluster's members
(the peers that are up, and this host) in the key's rendezvous order (regproxy.rendezvous). Every
host computes the same order from the same peer list, with no coordination.

A blob miss on this host, in order of the transfer's sources (regproxy.fetch tries the next when
one fails, is too slow, or sends bytes that do not match the digest):

1. the first :data:`NEAR` other members in the digest's order are asked with a lookup (a ``HEAD``,
   at once, within ``peers.timeout``): those that hold it committed are sources first;
2. with an upstream to fetch from (sync on, an upstream name): a *fetch request* to the home host,
   then to the next member in the order, up to this host's own place in it. The home answers from
   its store, from its transfer in flight, or from its own upstream through its own single
   flight, never from a peer (regproxy.proxy): N hosts that miss a blob at once cause one
   upstream transfer, and a request is never forwarded twice;
3. this host's own upstream;
4. a lookup of the remaining peers (content imported on one host of a large cluster, which no
   upstream holds), only once all of the above failed.

Manifests follow the same order (a fetch request by digest, or by tag, to the home), and a tag
this host holds is re-checked after ``tag_ttl`` by asking its home host, which alone asks the
upstream (a ``HEAD``), so a cluster makes one upstream ``HEAD`` per tag per ``tag_ttl``. The home
says how old its confirmation is (``Age``), so a tag is never older than ``tag_ttl`` anywhere.

With ``peers.home_hosts: false`` every peer is asked with a lookup and nobody fetches for anybody.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from regproxy.errors import BlobUnknown, UpstreamError
from regproxy.fetch import Source, Stream
from regproxy.oci import Digest, is_digest_reference
from regproxy.peers import Peer, Peers
from regproxy.upstream import ManifestGet

#: how many other members a miss asks with a lookup (the home host and 2 more)
NEAR: Final = 3
#: how many members a miss sends a fetch request to (the home host, then the next)
HOMES: Final = 2
#: the remaining peers are looked up this many at a time (in rendezvous order), up to a holder
WIDE_BATCH: Final = 8


@dataclass(frozen=True, slots=True)
class Found:
    """A manifest a peer answered with."""

    peer: str
    got: ManifestGet
    #: from a fetch request to its home host (which confirmed a tag ``got.age`` seconds ago)
    home: bool


@dataclass(frozen=True, slots=True)
class TagCheck:
    """A home host's answer for a tag this host holds."""

    peer: str
    digest: Digest
    age: float | None
    #: the manifest, when the tag moved (None: it is still the digest this host holds)
    got: ManifestGet | None


class Cluster:
    def __init__(self, peers: Peers) -> None:
        self.peers = peers

    @property
    def enabled(self) -> bool:
        return self.peers.enabled

    def _near(self, order: list[Peer]) -> list[Peer]:
        others = [p for p in order if not p.is_self]
        return others[:NEAR] if self.peers.home_hosts else self.peers.usable()

    def homes(self, key: str) -> list[Peer]:
        """The members a miss of ``key`` sends a fetch request to: the home host and the next,
        up to this host's own place in the order (none when this host is the home)."""
        if not self.peers.home_hosts:
            return []
        out: list[Peer] = []
        for p in self.peers.order(key):
            if p.is_self or len(out) == HOMES:
                break
            out.append(p)
        return out

    def is_home(self, key: str) -> bool:
        """This host is the key's home (or has no home host to ask)."""
        return not self.homes(key)

    # --- blobs -----------------------------------------------------------------------------------
    async def blob_sources(
        self, repo: str, digest: Digest, upstream: Source | None
    ) -> list[Source]:
        order = self.peers.order(str(digest))
        near = self._near(order)
        holders = await self.peers.blob_holders(near, repo, digest)
        held = {p.url for p, _ in holders}
        sources = [self.peers.blob_source(p, repo, fetch=False) for p, _ in holders]
        if upstream is not None:
            for p in self.homes(str(digest)):
                if p.url not in held:
                    sources.append(self.peers.blob_source(p, repo, fetch=True))
            sources.append(upstream)
        asked = {p.url for p in near}
        if any(p.url not in asked for p in self.peers.usable()):
            sources.append(self._rest(repo, asked))
        return sources

    def _rest(self, repo: str, asked: set[str]) -> Source:
        """The peers not asked yet, looked up only when every source before failed."""
        chosen: list[Peer] = []

        async def open_blob(digest: Digest, offset: int) -> Stream:
            for peer, _size in await self._holders_beyond(asked, repo, digest):
                try:
                    stream = await self.peers.blob_source(peer, repo, fetch=False).open(
                        digest, offset
                    )
                except (BlobUnknown, UpstreamError):
                    continue
                chosen[:] = [peer]
                return stream
            raise BlobUnknown(str(digest))

        def bad() -> None:
            if chosen:
                self.peers.failed(
                    chosen[0],
                    f"{repo} blob",
                    UpstreamError(chosen[0].url, "sent wrong bytes", kind="digest_mismatch"),
                    hold=True,
                )

        def cut(digest: Digest, exc: UpstreamError) -> None:
            if chosen:
                self.peers.failed(chosen[0], f"GET {repo}@{digest} body", exc)

        def usable() -> bool:
            return not chosen or self.peers.liveness.is_up(chosen[0].url)

        return Source("peers", "peer", open_blob, bad, on_cut=cut, usable=usable)

    async def blob_size(self, repo: str, digest: Digest, *, wide: bool) -> int | None:
        """The size a peer that holds the blob answers a lookup with (``wide``: the remaining
        peers too, when the near ones do not hold it)."""
        near = self._near(self.peers.order(str(digest)))
        found = await self.peers.blob_holders(near, repo, digest)
        if not found and wide:
            found = await self._holders_beyond({p.url for p in near}, repo, digest)
        return found[0][1] if found else None

    def _beyond(self, asked: set[str], key: str) -> list[list[Peer]]:
        """The peers not asked yet, in the key's order, in batches of :data:`WIDE_BATCH`."""
        rest = [p for p in self.peers.order(key) if not p.is_self and p.url not in asked]
        return [rest[i : i + WIDE_BATCH] for i in range(0, len(rest), WIDE_BATCH)]

    async def _holders_beyond(
        self, asked: set[str], repo: str, digest: Digest
    ) -> list[tuple[Peer, int]]:
        """The first batch of the remaining peers with a holder of the blob (lookups)."""
        for batch in self._beyond(asked, str(digest)):
            found = await self.peers.blob_holders(batch, repo, digest)
            if found:
                return found
        return []

    # --- manifests -------------------------------------------------------------------------------
    async def manifest(
        self, repo: str, reference: str, *, homes: bool, near: bool, wide: bool
    ) -> Found | None:
        """A manifest from the cluster: ``homes``: a fetch request to the home hosts; ``near``:
        a lookup of the near members; ``wide``: then of every other peer. Digests verified."""
        digest = is_digest_reference(reference)
        key = reference if digest else f"{repo}:{reference}"
        what = f"GET {repo}:{reference}"
        if homes:
            for p in self.homes(key):
                found = await self.peers.first(
                    [p], self.peers.manifest_op(repo, reference, fetch=True), what
                )
                if found is not None and self._verified(found[0], reference, found[1]):
                    return Found(p.url, found[1], home=True)
        asked: set[str] = set()
        groups: list[list[Peer]] = []
        if near:
            groups.append(self._near(self.peers.order(key)))
            asked = {p.url for p in groups[0]}
        if wide:
            groups.extend(self._beyond(asked, key))
        lookup = self.peers.manifest_op(repo, reference, fetch=False)
        timeout = self.peers.config.timeout
        for group in groups:
            for peer, got in await self.peers.ask(group, lookup, what, within=timeout):
                if self._verified(peer, reference, got):
                    return Found(peer.url, got, home=False)
        return None

    def _verified(self, peer: Peer, reference: str, got: ManifestGet) -> bool:
        if not is_digest_reference(reference):
            return True
        want = Digest.parse(reference)
        if Digest.of(got.body, want.algorithm) == want:
            return True
        self.peers.metrics.peer_meters.failed(peer.url, "digest_mismatch")
        self.peers.failed(
            peer,
            f"manifest {reference}",
            UpstreamError(peer.url, "sent a manifest that does not match", kind="digest_mismatch"),
            hold=True,
        )
        return False

    async def check_tag(self, repo: str, tag: str, have: str) -> TagCheck | None:
        """Ask the tag's home host (a ``HEAD`` fetch request: it re-checks the tag upstream when
        its own confirmation is older than ``tag_ttl``); the manifest only when it moved.
        None: no home host answered (or this host is the home)."""
        what = f"HEAD {repo}:{tag}"
        for p in self.homes(f"{repo}:{tag}"):
            found = await self.peers.first([p], self.peers.head_op(repo, tag), what)
            if found is None:
                continue
            head = found[1]
            if head.digest is not None and str(head.digest) == have:
                return TagCheck(p.url, head.digest, head.age, None)
            ref = str(head.digest) if head.digest is not None else tag
            got = await self.peers.first(
                [p], self.peers.manifest_op(repo, ref, fetch=True), f"GET {repo}:{ref}"
            )
            if got is None or not self._verified(p, ref, got[1]):
                continue
            return TagCheck(p.url, got[1].digest, head.age, got[1])
        return None
