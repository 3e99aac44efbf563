"""Pull-through: the registry, local first, with misses fetched from peers and upstreams.

A local-first decorator over :class:`Registry` (distribution's proxy design): a hit never leaves
the host. Manifests by digest are immutable and never re-checked; a tag older than ``tag_ttl``
is confirmed with a HEAD upstream, and served stale when the upstream cannot answer. Blob misses
go through the single-flight :class:`Fetcher`. With sync disabled no upstream is ever dialled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from regproxy import metrics
from regproxy.async_index import AsyncIndex
from regproxy.config import Config
from regproxy.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    OCIError,
    UpstreamError,
)
from regproxy.fetch import Fetcher, Source, Stream
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Descriptor, Digest, is_digest_reference
from regproxy.peers import Peers
from regproxy.referrers import Referrers
from regproxy.registry import LOCAL_ONLY, Blob, Manifest, ManifestGone, Registry, note
from regproxy.store import Store
from regproxy.upstream import UpstreamClient

log = logging.getLogger("regproxy.proxy")
T = TypeVar("T")


def _count(kind: str, result: str, upstream: str) -> None:
    """A cache hit, miss or stale answer: counted, and noted for the access log."""
    metrics.CACHE.labels(kind, result, upstream).inc()
    note(cache=result, upstream=upstream)


class ProxyRegistry(Registry):
    def __init__(self, store: Store, db: AsyncIndex, config: Config) -> None:
        super().__init__(store, db)
        self.config = config
        self.fetcher = Fetcher(store, self._on_fetched)
        self._clients: dict[str, UpstreamClient] = {}
        self._manifest_flights: dict[tuple[str, str], asyncio.Future[Any]] = {}
        #: the cluster's other hosts, asked before any upstream (None: no peers configured)
        self.peers: Peers | None = None
        #: referrers pulled through (upstream API or tag schema) and merged with local ones
        self.referrer_index = Referrers(self)

    async def close(self) -> None:
        if self.peers is not None:
            await self.peers.close()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        await super().close()

    # --- upstream selection ------------------------------------------------------------------------
    def upstream(self, repo: RepoName) -> UpstreamClient | None:
        """The client for the repository's host, or None: local-only, sync off or not configured."""
        if repo.host is None or not self.config.sync_enable or LOCAL_ONLY.get():
            return None
        client = self._clients.get(repo.host)
        if client is None:
            entry = self.config.upstream_for(repo.host)
            if entry is None:
                return None
            client = UpstreamClient(repo.host, entry, public_only=entry.pattern == "*")
            self._clients[repo.host] = client
        return client

    def _peers(self) -> Peers | None:
        if LOCAL_ONLY.get() or self.peers is None or not self.peers.enabled:
            return None
        return self.peers

    def active_peers(self) -> Peers | None:
        """The peers this request may ask (None for a peer's own request, or without peers)."""
        return self._peers()

    async def _known_or_unknown_name(self, repo: RepoName) -> None:
        """A host no upstream entry matches is never dialled: NAME_UNKNOWN when nothing is local."""
        if (
            repo.host is not None
            and self.config.sync_enable
            and self.config.upstream_for(repo.host) is None
            and not await self.repo_exists(repo)
        ):
            raise NameUnknown(f"{repo.canonical}: no upstream is configured for {repo.host}")

    async def _single(self, key: tuple[str, str], make: Callable[[], Awaitable[T]]) -> T:
        """Coalesce concurrent identical upstream manifest requests into one."""
        fut = self._manifest_flights.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._manifest_flights[key] = fut
        try:
            result = await make()
            fut.set_result(result)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody else waited
            raise
        finally:
            self._manifest_flights.pop(key, None)

    # --- manifests -------------------------------------------------------------------------------
    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest:
        try:
            return await self._get_manifest(repo, reference)
        except ManifestGone:
            # its file went between the lookup and the read (evicted): the lookup misses now,
            # so this fetches it again (upstream names) or is a 404, as if never here
            return await self._get_manifest(repo, reference)

    async def _get_manifest(self, repo: RepoName, reference: str) -> Manifest:
        found = await self.local_manifest(repo, reference)
        client = self.upstream(repo)
        label = repo.host or "local"
        if found is not None:
            row, checked = found
            if client is None or is_digest_reference(reference):
                _count("manifest", "hit", label)
                return await self.manifest_body(repo, row)
            if time.time() - checked < self.config.tag_ttl:
                _count("manifest", "hit", label)
                return await self.manifest_body(repo, row)
            try:
                fresh = await self._single(
                    ("tag", f"{repo.canonical}:{reference}"),
                    lambda: self._refresh_tag(repo, reference, row.digest, client),
                )
            except (TimeoutError, UpstreamError) as exc:
                metrics.STALE_SERVED.labels(label).inc()
                _count("manifest", "stale", label)
                log.warning(
                    "tag.stale repo=%s tag=%s digest=%s upstream=%s error=%s",
                    repo,
                    reference,
                    row.digest,
                    label,
                    exc,
                )
                return await self.manifest_body(repo, row)
            if fresh is None:  # gone upstream, or unchanged: what we hold is the answer
                _count("manifest", "hit", label)
                return await self.manifest_body(repo, row)
            _count("manifest", "miss", label)
            return fresh
        _count("manifest", "miss", label)
        peers = self._peers()
        if peers is not None and (client is None or is_digest_reference(reference)):
            # digests from the cluster first; tags from the cluster when no upstream may answer
            got = await self._single(
                ("peer", f"{repo.canonical}@{reference}"),
                lambda: self._manifest_from_peers(repo, reference, peers),
            )
            if got is not None:
                return got
        if client is None:
            await self._known_or_unknown_name(repo)
            raise ManifestUnknown(reference)
        try:
            result = await self._single(
                ("get", f"{repo.canonical}@{reference}"),
                lambda: self._fetch_manifest(repo, reference, client),
            )
        except UpstreamError:
            if peers is None or is_digest_reference(reference):
                raise
            # upstream unreachable: the cluster's answer for the tag is better than none
            result = await self._manifest_from_peers(repo, reference, peers)
            if result is None:
                raise
        if result is None:
            raise ManifestUnknown(reference)
        return result

    async def _manifest_from_peers(
        self, repo: RepoName, reference: str, peers: Peers
    ) -> Manifest | None:
        found = await peers.manifest(repo.canonical, reference)
        if found is None:
            return None
        peer, got = found
        if is_digest_reference(reference):
            want = Digest.parse(reference)
            if Digest.of(got.body, want.algorithm) != want:
                metrics.UPSTREAM_ERRORS.labels(peer, "digest_mismatch").inc()
                log.error("manifest.digest_mismatch repo=%s want=%s peer=%s", repo, want, peer)
                return None
        try:
            # checked=0: with sync on, the upstream confirms a peer's tag at the next request
            result = await self.put_manifest(
                repo,
                reference,
                got.body,
                got.media_type,
                verify_refs=False,
                pinned=False,
                checked=0.0,
            )
        except OCIError as exc:
            log.warning("manifest.peer_unusable repo=%s peer=%s error=%s", repo, peer, exc)
            return None
        log.info(
            "manifest.from_peer repo=%s reference=%s digest=%s peer=%s",
            repo,
            reference,
            result.digest,
            peer,
        )
        row = await self.local_manifest(repo, str(result.digest))
        assert row is not None
        return await self.manifest_body(repo, row[0])

    async def _refresh_tag(
        self, repo: RepoName, tag: str, have: str, client: UpstreamClient
    ) -> Manifest | None:
        """HEAD the tag upstream; GET only when it moved. None: keep what we have."""
        head = await client.head_manifest(repo.path, tag)
        if head is None:
            # what we hold stays the answer; confirm it for a tag_ttl, so a tag that upstream
            # dropped does not cost a HEAD on every request
            log.info("tag.gone_upstream repo=%s tag=%s upstream=%s", repo, tag, client.name)
            await self.mark_tag_checked(repo, tag)
            return None
        if head.digest is not None and str(head.digest) == have:
            await self.mark_tag_checked(repo, tag)
            return None
        return await self._fetch_manifest(repo, tag, client)

    async def _fetch_manifest(
        self, repo: RepoName, reference: str, client: UpstreamClient
    ) -> Manifest | None:
        got = await client.get_manifest(repo.path, reference)
        if got is None:
            return None
        if is_digest_reference(reference):
            want = Digest.parse(reference)
            actual = Digest.of(got.body, want.algorithm)
            if actual != want:
                metrics.UPSTREAM_ERRORS.labels(client.name, "digest_mismatch").inc()
                log.error(
                    "manifest.digest_mismatch repo=%s want=%s got=%s upstream=%s",
                    repo,
                    want,
                    actual,
                    client.name,
                )
                raise UpstreamError(
                    client.name, f"manifest {want} hashes to {actual}", kind="digest_mismatch"
                )
        try:
            result = await self.put_manifest(
                repo, reference, got.body, got.media_type, verify_refs=False, pinned=False
            )
        except DigestInvalid as exc:
            raise UpstreamError(
                client.name, f"bad manifest: {exc}", kind="digest_mismatch"
            ) from None
        except OCIError as exc:
            raise UpstreamError(client.name, f"unusable manifest: {exc}") from None
        log.info(
            "manifest.fetched repo=%s reference=%s digest=%s upstream=%s bytes=%d",
            repo,
            reference,
            result.digest,
            client.name,
            len(got.body),
        )
        row = await self.local_manifest(repo, str(result.digest))
        assert row is not None
        return await self.manifest_body(repo, row[0])

    async def _blobs_settled(self, digests: list[Digest]) -> None:
        """A push whose blobs are still arriving from upstream (a client's HEAD started them)
        waits for those transfers before the references are checked."""
        for digest in digests:
            transfer = self.fetcher.get(digest)
            if transfer is not None:
                with contextlib.suppress(OCIError):
                    await transfer.wait_done()

    # --- blobs ---------------------------------------------------------------------------------------
    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob:
        blob = await self.local_blob(repo, digest)
        label = repo.host or "local"
        if blob is not None:
            _count("blob", "hit", label)
            return blob
        if self.upstream(repo) is None and self._peers() is None:
            # nothing would fetch it: a pushed or imported repository holds what it was given
            # (a DELETE must stick, and repositories do not see each other's blobs)
            await self._known_or_unknown_name(repo)
            _count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        # a miss we would fetch from an upstream: verified bytes already here under another
        # name serve at once (not for local-only names: there a DELETE sticks on this host)
        if repo.host is not None and await self.mount_blob(repo, digest, None):
            blob = await self.local_blob(repo, digest)
            if blob is not None:
                _count("blob", "hit", label)
                return blob
        if LOCAL_ONLY.get():
            # a peer gets committed content only: never a transfer in flight, which could be
            # fed by that same peer (two hosts tailing each other would wait forever)
            _count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        transfer = self.fetcher.get(digest)
        if transfer is None:
            sources = await self._sources(repo, digest)
            transfer = self.fetcher.get(digest)  # another request may have started it meanwhile
        if transfer is None:
            if not sources:
                await self._known_or_unknown_name(repo)
                _count("blob", "miss", label)
                raise BlobUnknown(str(digest))
            await self._ensure_repo(repo)
            transfer = self.fetcher.start(digest, sources, repo.canonical)
        _count("blob", "miss", label)
        size = await transfer.wait_size()
        return Blob(digest, size, stream=transfer)

    async def _sources(self, repo: RepoName, digest: Digest) -> list[Source]:
        peers = self._peers()
        sources = await peers.blob_sources(repo.canonical, digest) if peers is not None else []
        client = self.upstream(repo)
        if client is not None:
            path = repo.path

            async def open_upstream(digest: Digest, offset: int) -> Stream:
                return await client.open_blob(path, digest, offset)

            sources.append(Source(client.name, "upstream", open_upstream))
        return sources

    async def _on_fetched(self, digest: Digest, size: int, repo: str, source: str) -> None:
        await self.db.write(Index.add_blob, repo, str(digest), size)
        self._stored()

    # --- listings ------------------------------------------------------------------------------------
    async def referrers(
        self, repo: RepoName, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        return await self.referrer_index.lookup(repo, subject, artifact_type)

    async def list_tags(self, repo: RepoName, n: int | None, last: str | None) -> list[str]:
        client = self.upstream(repo)
        local_exists = await self.repo_exists(repo)
        if client is None:
            if not local_exists:
                await self._known_or_unknown_name(repo)
            return await super().list_tags(repo, n, last)
        try:
            remote = await client.list_tags(repo.path)
        except UpstreamError as exc:
            log.warning("tags.upstream_failed repo=%s upstream=%s error=%s", repo, client.name, exc)
            remote = None
        local = (
            await self.db.read(Index.list_tags, repo.canonical, None, None) if local_exists else []
        )
        if remote is None and not local_exists:
            raise NameUnknown(repo.canonical)
        tags = sorted(set(local) | set(remote or []))
        if last:
            tags = [t for t in tags if t > last]
        return tags if n is None else tags[:n]


def build_registry(config: Config) -> ProxyRegistry:
    """The daemon's registry over the configured store (also used by the CLI tools)."""
    root = config.storage.root
    return ProxyRegistry(Store(root), AsyncIndex(root / "index.db"), config)
