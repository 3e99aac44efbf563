"""Pull-through: the registry, local first, with misses fetched from peers and upstreams.

A local-first decorator around a :class:`LocalRegistry` (distribution's proxy design): it
wraps one, answers what the host holds from it, and asks peers and upstreams only for misses; a
hit never leaves the host. Manifests by digest are immutable and never re-checked; a tag older than ``tag_ttl``
is confirmed with a HEAD upstream, and served stale when the upstream cannot answer. Blob misses
go through the single-flight :class:`Fetcher`. With sync disabled no upstream is ever dialled.

Manifest fills, tag re-checks and tag lists are single flights too, each in a task of its own:
the first requester hanging up cancels nobody else's answer. A miss stores nothing about the
name: a repository row is written with the first content stored under it, so misses on names
that do not exist upstream leave no trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TypeVar

from regproxy.async_index import AsyncIndex
from regproxy.cluster import Cluster
from regproxy.cluster_manifests import FromCluster
from regproxy.config import Config
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.errors import (
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    OCIError,
    StorageFull,
    StoreFailed,
    UpstreamError,
)
from regproxy.fetch import Fetcher, Source, Stream
from regproxy.flights import SingleFlights
from regproxy.index import Index
from regproxy.inflight import Transfer
from regproxy.lookups import LRU
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import MAX_TAGS, Descriptor, Digest, is_digest_reference
from regproxy.page_cache import physical_memory
from regproxy.peers import Peers
from regproxy.referrers import Referrers
from regproxy.registry import (
    HOME_REQUEST,
    LOCAL_ONLY,
    PROBE,
    Blob,
    LocalRegistry,
    Manifest,
    ManifestGone,
    note,
)
from regproxy.settling import settle_row
from regproxy.space import Space
from regproxy.store import Store
from regproxy.upstream import TagPage, UpstreamClient
from regproxy.upstream.pool import ClientPool
from regproxy.upstream_manifests import FromUpstream

log = logging.getLogger("regproxy.proxy")
T = TypeVar("T")
#: how many tags served stale are remembered for the web page (the oldest are forgotten first)
STALE_KEEP = 10_000


class ProxyRegistry:
    """A :class:`~regproxy.registry.Registry`: the local registry it wraps first, then the
    cluster's peers and the upstreams for misses."""

    def __init__(
        self,
        store: Store,
        db: AsyncIndex,
        config: Config,
        *,
        timing: Timing = DEFAULT_TIMING,
        metrics: Metrics | None = None,
    ) -> None:
        #: the app's metrics (counted into by everything this registry owns)
        self.metrics = metrics if metrics is not None else Metrics()
        #: room for pull-through blobs and pushed bodies, reserved before their first byte
        #: (the evictor frees it): fetches and uploads in flight see each other's reservations
        self.space = Space(config.storage, store.disk_usage, self._stored_bytes, self.metrics)
        local = LocalRegistry(
            store,
            db,
            max_upload_sessions=config.uploads.max_sessions,
            settle=self._settle_blobs,
            metrics=self.metrics,
            space=self.space,
        )
        #: what this host holds: every answer starts here
        self.local = local
        self.store, self.db, self.uploads, self.cache = store, db, local.uploads, local.cache
        # what only the store can answer goes straight to it
        self.open = local.open
        self.pending_access = local.pending_access
        self.unflushed_access = local.unflushed_access
        self.flush_access = local.flush_access
        self.confirm_lookups = local.confirm_lookups
        self.local_blob = local.local_blob
        self.forget_lost_blob = local.forget_lost_blob
        self.delete_blob = local.delete_blob
        self.mount_blob = local.mount_blob
        self.commit_blob = local.commit_blob
        self.index_blob = local.index_blob
        self.local_manifest = local.local_manifest
        self.manifest_body = local.manifest_body
        self.put_manifest = local.put_manifest
        self.mark_tag_checked = local.mark_tag_checked
        self.delete_manifest = local.delete_manifest
        self.repo_exists = local.repo_exists
        self.catalog = local.catalog
        self.subscribe_stored = local.subscribe_stored
        self.config = config
        self.timing = timing
        #: manifests the cluster's hosts answer, stored in the local registry
        self.from_cluster = FromCluster(local, timing, config.tag_ttl)
        #: manifests the upstreams answer, stored in the local registry
        self.from_upstream = FromUpstream(local, timing, self.metrics)
        settle = functools.partial(settle_row, db, local.cache, store)  # its row back if it fails
        self.fetcher = Fetcher(
            store, self._on_fetched, settle, timing=timing, metrics=self.metrics, space=self.space
        )
        self.clients = ClientPool(config, timing=timing, metrics=self.metrics)
        self._flights = SingleFlights("upstream")
        #: names of blobs being fetched, so the first commit can create the repository row
        self._fill_names: LRU[str, RepoName] = LRU(4096)
        #: when shutdown began (the clock of ``timing``): transfers drain until the timeout
        self._shutdown_started: float | None = None
        #: the cluster's other hosts, asked before any upstream (None: no peers configured)
        self.peers: Peers | None = None
        #: what a miss asks of them, and in which order (home hosts)
        self.cluster: Cluster | None = None
        #: referrers pulled through (upstream API or tag schema) and merged with local ones
        self.referrer_index = Referrers(self)
        #: (repository, tag) -> when it was last served stale because the upstream could not
        #: confirm it (the web page's "stale": only while no later check confirmed the tag)
        self.stale_served: OrderedDict[tuple[str, str], float] = OrderedDict()

    def begin_shutdown(self) -> None:
        """The daemon stops taking requests: in-flight transfers get ``shutdown_timeout`` from now."""
        if self._shutdown_started is None:
            self._shutdown_started = self.timing.now()

    async def close(self) -> None:
        started = self._shutdown_started
        left = self.config.shutdown_timeout
        if started is not None:
            left = max(0.0, left - (self.timing.now() - started))
        await self.fetcher.drain(left)
        self._flights.cancel_all()
        if self.peers is not None:
            await self.peers.close()
        await self.clients.close()
        await self.local.close()

    # --- upstream selection ------------------------------------------------------------------------
    def upstream(self, repo: RepoName) -> UpstreamClient | None:
        """The client for the repository's host, or None: local-only, sync off or not configured."""
        if repo.host is None or not self.config.sync_enable or LOCAL_ONLY.get():
            return None
        return self.clients.get(repo.host)

    def _label(self, repo: RepoName) -> str:
        """The upstream label of metrics: a configured host, else ``local`` (hosts no entry
        matches come from clients, and must not grow the label sets)."""
        if repo.host is not None and self.config.upstream_for(repo.host) is not None:
            return repo.host
        return "local"

    def _count(self, kind: str, result: str, upstream: str) -> None:
        """A cache hit, miss or stale answer: counted (unless the request only asks whether the
        content exists, see :data:`PROBE`), and noted for the access log."""
        if not PROBE.get():
            self.metrics.lookup(kind, result, upstream)
        note(cache=result, upstream=upstream)

    def attach_peers(self, peers: Peers) -> None:
        self.peers = peers
        self.cluster = Cluster(peers)

    def _peers(self) -> Peers | None:
        """The peers this request may ask: none for a peer's own request (a lookup, or a fetch
        request to this host as the home host), so a request is never forwarded twice."""
        if LOCAL_ONLY.get() or HOME_REQUEST.get() or self.peers is None or not self.peers.enabled:
            return None
        return self.peers

    def _cluster(self) -> Cluster | None:
        return self.cluster if self._peers() is not None else None

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

    async def _single(self, key: tuple[str, ...], make: Callable[[], Awaitable[T]]) -> T:
        """Coalesce concurrent identical upstream requests into one, run in a task of its own:
        a requester that goes away (cancelled) leaves the others their answer. The work is
        bounded by the upstream's own time limits."""
        return await self._flights.run(key, make)

    # --- manifests -------------------------------------------------------------------------------
    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest:
        try:
            m = await self._get_manifest(repo, reference)
        except ManifestGone:
            # its file went between the lookup and the read (evicted): the lookup misses now,
            # so this fetches it again (upstream names) or is a 404, as if never here
            m = await self._get_manifest(repo, reference)
        if HOME_REQUEST.get() and not is_digest_reference(reference):
            # as the tag's home host: say how long ago the upstream confirmed it (``Age``)
            found = await self.local_manifest(repo, reference)
            if found is not None and found[1] > 0:
                m = dataclasses.replace(m, age=max(0.0, self.timing.wall() - found[1]))
        return m

    def _believed(self, reference: str, checked: float) -> bool:
        """Whether what this host holds for ``reference`` is the answer without asking the
        upstream: a digest (immutable), or a tag confirmed within tag_ttl."""
        return is_digest_reference(reference) or self._fresh(checked)

    def cached_manifest(self, repo: RepoName, reference: str) -> tuple[Manifest, str] | None:
        """What :meth:`get_manifest` answers a client's request (not a peer's) when all it
        needs is in memory: the manifest (its access recorded) and the upstream label of the
        hit, which the caller counts (``metrics.lookup``) if it serves it. None: ask
        :meth:`get_manifest`."""
        found = self.local.cached_manifest_row(repo, reference)
        if found is None:
            return None
        if self.upstream(repo) is not None and not self._believed(reference, found[1]):
            return None
        m = self.local.cached_manifest(repo, found[0])
        return None if m is None else (m, self._label(repo))

    def cached_blob(self, repo: RepoName, digest: Digest, files: bool) -> tuple[Blob, str] | None:
        """What :meth:`get_blob` answers a client's GET from memory (``LocalRegistry.cached_blob``)
        and the hit's upstream label, which the caller counts if it serves it; else None."""
        blob = self.local.cached_blob(repo, digest, files)
        return None if blob is None else (blob, self._label(repo))

    async def _get_manifest(self, repo: RepoName, reference: str) -> Manifest:
        found = await self.local_manifest(repo, reference)
        client = self.upstream(repo)
        label = self._label(repo)
        cluster = self._cluster()
        by_digest = is_digest_reference(reference)
        if found is not None:
            row, checked = found
            if client is None or self._believed(reference, checked):
                self._count("manifest", "hit", label)
                return await self.manifest_body(repo, row)
            if cluster is not None and not cluster.is_home(f"{repo.canonical}:{reference}"):
                # the tag's home host re-checks it upstream; this host asks the home
                answer = await self._single(
                    ("home-tag", f"{repo.canonical}:{reference}"),
                    lambda: self.from_cluster.tag_from_home(repo, reference, row.digest, cluster),
                )
                if answer is not None:
                    m, outcome = answer
                    if outcome == "stale":  # the home could not confirm it either
                        self._served_stale(repo, reference, label)
                    self._count("manifest", outcome, label)
                    return m
            try:
                fresh = await self._single(
                    ("tag", f"{repo.canonical}:{reference}"),
                    lambda: self.from_upstream.refresh_tag(repo, reference, row.digest, client),
                )
            except (TimeoutError, UpstreamError, StorageFull, StoreFailed) as exc:
                # (our disk could not take the new manifest: what we hold is still served)
                self._served_stale(repo, reference, label)
                self._count("manifest", "stale", label)
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
                self._count("manifest", "hit", label)
                return await self.manifest_body(repo, row)
            self._count("manifest", "miss", label)
            return fresh
        self._count("manifest", "miss", label)
        if cluster is not None:
            # with an upstream: the home host fetches it (and, by digest, the near hosts are
            # looked up); without: the cluster's hosts are looked up
            got = await self._single(
                ("cluster", f"{repo.canonical}@{reference}"),
                lambda: self.from_cluster.manifest(
                    repo,
                    reference,
                    cluster,
                    homes=client is not None,
                    near=by_digest or client is None,
                    wide=client is None,
                ),
            )
            if got is not None:
                return got
            # while the cluster was asked, another request may have stored it here (as the
            # home host: a peer's fetch request, which went upstream): no second upstream GET
            again = await self.local_manifest(repo, reference)
            if again is not None and self._believed(reference, again[1]):
                return await self.manifest_body(repo, again[0])
        if client is None:
            await self._known_or_unknown_name(repo)
            raise ManifestUnknown(reference)
        try:
            result = await self._single(
                ("get", f"{repo.canonical}@{reference}"),
                lambda: self.from_upstream.fetch(repo, reference, client),
            )
        except UpstreamError:
            if cluster is None:
                raise
            # upstream unreachable: whatever the cluster holds is better than nothing
            result = await self.from_cluster.manifest(
                repo, reference, cluster, homes=False, near=True, wide=True
            )
            if result is None:
                raise
        if result is None and cluster is not None and not by_digest:
            # unknown upstream: a near host may hold it (imported there)
            result = await self.from_cluster.manifest(
                repo, reference, cluster, homes=False, near=True, wide=False
            )
        if result is None:
            raise ManifestUnknown(reference)
        return result

    def _served_stale(self, repo: RepoName, tag: str, label: str) -> None:
        """A tag served although nobody could confirm it within tag_ttl: counted, and kept for
        the web page."""
        self.metrics.stale(label)
        self.stale_served[(repo.canonical, tag)] = self.timing.wall()
        self.stale_served.move_to_end((repo.canonical, tag))
        if len(self.stale_served) > STALE_KEEP:
            self.stale_served.popitem(last=False)

    def _fresh(self, checked: float) -> bool:
        return self.timing.wall() - checked < self.config.tag_ttl

    async def _settle_blobs(self, repo: RepoName, digests: list[Digest]) -> None:
        """Before a pushed manifest's references are checked: blobs that this repository's
        upstream (or a peer) holds are fetched now. A pushing client's HEAD found them there and
        skipped their upload; a HEAD does not fetch (it asks upstream with a HEAD)."""
        missing = await self.db.read(Index.missing_blobs, repo.canonical, [str(d) for d in digests])

        async def settle(digest: Digest) -> None:
            with contextlib.suppress(OCIError):
                blob = await self.get_blob(repo, digest)
                if blob.stream is not None:
                    await blob.stream.wait_done()

        await asyncio.gather(*(settle(Digest.parse(d)) for d in missing))

    # --- blobs ---------------------------------------------------------------------------------------
    async def _local_or_mounted(self, repo: RepoName, digest: Digest) -> Blob | None:
        """Committed here: in this repository, or (for an upstream name) under another name."""
        blob = await self.local_blob(repo, digest)
        if blob is not None or (self.upstream(repo) is None and self._peers() is None):
            return blob
        # a miss we would fetch from an upstream: verified bytes already here under another
        # name serve at once (not for local-only names: there a DELETE sticks on this host)
        if repo.host is not None and await self.mount_blob(repo, digest, None):
            return await self.local_blob(repo, digest)
        return None

    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob:
        label = self._label(repo)
        blob = await self._local_or_mounted(repo, digest)
        if blob is not None:
            self._count("blob", "hit", label)
            return blob
        if self.upstream(repo) is None and self._peers() is None:
            # nothing would fetch it: a pushed or imported repository holds what it was given
            # (a DELETE must stick, and repositories do not see each other's blobs)
            await self._known_or_unknown_name(repo)
            self._count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        if LOCAL_ONLY.get():
            # a peer gets committed content only: never a transfer in flight, which could be
            # fed by that same peer (two hosts tailing each other would wait forever)
            self._count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        transfer = self._joinable(digest, label)
        if transfer is None:
            sources = await self._sources(repo, digest)
            transfer = self._joinable(digest, label)  # another request may have started it
        if transfer is None:
            if not sources:
                await self._known_or_unknown_name(repo)
                self._count("blob", "miss", label)
                raise BlobUnknown(str(digest))
            # no repository row yet: the commit writes it (a miss upstream leaves nothing)
            self._fill_names.put(repo.canonical, repo)
            transfer = self.fetcher.start(digest, sources, repo.canonical)
        self._count("blob", "miss", label)
        size = await transfer.wait_size()
        return Blob(digest, size, stream=transfer)

    async def head_blob(self, repo: RepoName, digest: Digest) -> Blob:
        """HEAD: what we hold, a transfer's size, else the peers' or the upstream's answer to a
        HEAD of their own. Nothing is downloaded for a HEAD."""
        label = self._label(repo)
        blob = await self._local_or_mounted(repo, digest)
        if blob is not None:
            self._count("blob", "hit", label)
            return blob
        client = self.upstream(repo)
        peers = self._peers()
        if LOCAL_ONLY.get() or (client is None and peers is None):
            if not LOCAL_ONLY.get():
                await self._known_or_unknown_name(repo)
            self._count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        self._count("blob", "miss", label)
        transfer = self.fetcher.get(digest)
        if transfer is not None:
            return Blob(digest, await transfer.wait_size())
        cluster = self._cluster()
        if cluster is not None:
            held = await cluster.blob_size(repo.canonical, digest, wide=client is None)
            if held is not None:
                await self.space.never_kept(
                    held, digest=digest, repo=repo.canonical, source="peers"
                )
                return Blob(digest, held)
        if client is None:
            raise BlobUnknown(str(digest))
        size = await client.head_blob(repo.path, digest)
        if size is None:
            raise BlobUnknown(str(digest))
        if size < 0:  # the upstream did not say: only a GET can tell
            return await self.get_blob(repo, digest)
        # as a GET would: 507 for a blob that can never be kept (room above min_free, which
        # changes, is a GET's to reserve and to evict for)
        await self.space.never_kept(size, digest=digest, repo=repo.canonical, source="upstream")
        return Blob(digest, size)

    def _joinable(self, digest: Digest, label: str) -> Transfer | None:
        """The transfer in flight for the digest, if this request may tail it. A peer's fetch
        request never joins a transfer fed by another host's (its home host's) transfer:
        that host could be the one asking, and two hosts tailing each other wait forever."""
        transfer = self.fetcher.get(digest)
        if transfer is not None and HOME_REQUEST.get() and "home" in transfer.kinds:
            log.info("blob.not_joined digest=%s reason=fed_by_a_peer", digest)
            self._count("blob", "miss", label)
            raise BlobUnknown(str(digest))
        return transfer

    async def _sources(self, repo: RepoName, digest: Digest) -> list[Source]:
        upstream: Source | None = None
        client = self.upstream(repo)
        if client is not None:
            path = repo.path

            async def open_upstream(digest: Digest, offset: int) -> Stream:
                return await client.open_blob(path, digest, offset)

            limits = client.transport.limits
            upstream = Source(client.name, "upstream", open_upstream, limits=limits)
        cluster = self._cluster()
        if cluster is None:
            return [upstream] if upstream is not None else []
        return await cluster.blob_sources(repo.canonical, digest, upstream)

    async def _stored_bytes(self) -> int:
        return await self.db.read(Index.store_bytes)

    async def _on_fetched(self, digest: Digest, size: int, repo: str, source: str) -> None:
        name = self._fill_names.get(repo) or RepoName(repo)
        await self.local.index_blob(name, digest, size)

    # --- listings ------------------------------------------------------------------------------------
    async def referrers(
        self, repo: RepoName, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        return await self.referrer_index.lookup(repo, subject, artifact_type)

    async def list_tags(self, repo: RepoName, n: int | None, last: str | None) -> list[str]:
        """Upstream's tags (``n``/``last`` passed through, coalesced) merged with ours; when the
        upstream fails, ours if we have any, else its error (502)."""
        client = self.upstream(repo)
        local_exists = await self.repo_exists(repo)
        if client is None:
            if not local_exists:
                await self._known_or_unknown_name(repo)
            return await self.local.list_tags(repo, n, last)
        want = n if n is not None else MAX_TAGS
        remote: TagPage | None
        try:
            remote = await self._single(
                ("tags", repo.canonical, str(want), last or ""),
                lambda: client.list_tags(repo.path, want, last),
            )
        except UpstreamError as exc:
            if not local_exists:
                raise
            log.warning("tags.upstream_failed repo=%s upstream=%s error=%s", repo, client.name, exc)
            remote = None
        if remote is None and not local_exists:
            raise NameUnknown(repo.canonical)
        local = (
            await self.db.read(Index.list_tags, repo.canonical, want, last) if local_exists else []
        )
        tags = sorted(set(local) | set(remote.tags if remote is not None else ()))
        return tags[:want]


def build_registry(
    config: Config, *, timing: Timing = DEFAULT_TIMING, metrics: Metrics | None = None
) -> ProxyRegistry:
    """The daemon's registry over the configured store (also used by the CLI tools)."""
    root = config.storage.root
    drop_above = config.storage.drop_behind_above.resolve(physical_memory())
    store, db = Store(root, drop_above=drop_above), AsyncIndex(root / "index.db")
    return ProxyRegistry(store, db, config, timing=timing, metrics=metrics)
