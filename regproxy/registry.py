"""The registry: OCI semantics over the store and the index. Knows no HTTP.

:class:`LocalRegistry` is what this host holds, nothing fetched; :class:`Registry` is what the
HTTP layer and the tools ask of a registry, which :class:`regproxy.proxy.ProxyRegistry` also is
by wrapping a local one (local first, then peers and upstreams).

Every blocking call runs off the event loop: index calls through the one async facade
(:class:`~regproxy.async_index.AsyncIndex`: changes on its writer thread, lookups on its
readers), file calls on the default executor. Small immutable objects (manifests, small
blobs) and positive lookups are cached in memory, bounded, so the hot path of a warm cache does
no disk I/O and no thread hop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from regproxy import manifest_put
from regproxy.access_times import AccessTimes
from regproxy.async_index import AsyncIndex
from regproxy.errors import (
    BlobUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    DigestMismatch,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
)
from regproxy.index import Index, ManifestRow
from regproxy.lookup_confirm import IndexWatch
from regproxy.lookups import LookupCache
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import Descriptor, Digest, is_digest_reference, parse_manifest_async, validate_tag
from regproxy.removal import settle_spares
from regproxy.settling import settle_row
from regproxy.space import Space
from regproxy.store import BlobWriter, Store
from regproxy.uploads import DEFAULT_MAX_SESSIONS, UploadSessions

log = logging.getLogger("regproxy.registry")
T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")

#: set for requests that must be answered from the local store only (requests from peers)
LOCAL_ONLY: ContextVar[bool] = ContextVar("regproxy_local_only", default=False)
#: set for requests that only ask whether content exists (a blob HEAD, as pushing clients send):
#: not a pull, so neither counted as a cache lookup nor recorded as an access ("last pulled")
PROBE: ContextVar[bool] = ContextVar("regproxy_probe", default=False)
#: set for a peer's fetch request to this host as the home host (regproxy.cluster): answered from
#: the store, a transfer in flight or this host's own upstream, never from another peer
HOME_REQUEST: ContextVar[bool] = ContextVar("regproxy_home_request", default=False)
#: what a request's lookup found (cache: hit|miss|stale, upstream: host), for the access log
NOTES: ContextVar[dict[str, str] | None] = ContextVar("regproxy_notes", default=None)


def note(**items: str) -> None:
    """Record facts about the current request for its access-log line (no-op outside one)."""
    notes = NOTES.get()
    if notes is not None:
        notes.update(items)


SMALL_OBJECT: Final = 64 * 1024  # served from memory at or below this size


class ManifestGone(ManifestUnknown):
    """A manifest's file went between its lookup and the read (evicted, or lost): for a local
    repository a 404 like any unknown manifest; a pull-through looks it up again (a miss)."""


#: a manifest up to this size has its body read with its row (see ``_row_and_body``)
BODY_WITH_ROW_MAX: Final = 64 * 1024


def _row_and_body(
    ix: Index, store: Store, repo: str, reference: str, by_digest: bool
) -> tuple[ManifestRow | None, bytes | None]:
    """On an index reader: a manifest's row by digest or tag, and its body if it is small and
    its file is there (a file gone since is the caller's ``manifest_body`` to find out)."""
    row = ix.manifest_in_repo(repo, reference) if by_digest else ix.resolve_tag(repo, reference)
    if row is None or row.size > BODY_WITH_ROW_MAX:
        return row, None
    try:
        return row, store.read(Digest.parse(row.digest))
    except OSError:
        return row, None


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob ready to serve: small ones carry their bytes, big ones a file for sendfile."""

    digest: Digest
    size: int
    data: bytes | None = None
    file: Path | None = None
    #: an in-flight upstream transfer to tail (pull-through), when the blob is not committed yet
    stream: Any = None


@dataclass(frozen=True, slots=True)
class Manifest:
    digest: Digest
    media_type: str
    size: int
    body: bytes
    #: for a tag answered to a peer as its home host: seconds since the upstream confirmed it
    age: float | None = None


@dataclass(frozen=True, slots=True)
class PutResult:
    digest: Digest
    subject: Digest | None


#: awaited before a pushed manifest's blob references are checked, with the blobs it lists: a
#: wrapper may let blobs still on their way into the store arrive (pull-through)
Settle = Callable[[RepoName, list[Digest]], Awaitable[None]]


class LocalRegistry:
    """OCI rules over this host's store and index: nothing is fetched from anywhere."""

    def __init__(
        self,
        store: Store,
        db: AsyncIndex,
        *,
        max_upload_sessions: int = DEFAULT_MAX_SESSIONS,
        settle: Settle | None = None,
        metrics: Metrics | None = None,
        space: Space | None = None,
    ) -> None:
        #: this registry's metrics (the app's, or a fresh registry of their own)
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self._settle = settle
        #: the index, for every module: ``await registry.db.read(Index.x, ...)`` / ``.write``
        self.db = db
        #: blob upload sessions (regproxy.uploads); their commits go through :meth:`commit_blob`,
        #: their bodies reserve room in ``space`` first (the pull-through's, when there is one)
        self.uploads = UploadSessions(
            store, db, self.commit_blob, max_upload_sessions, metrics=self.metrics, space=space
        )
        #: cached lookups; ``registry.cache.forget(...)`` is how a change invalidates them
        self.cache = LookupCache()
        #: when each (repository, digest) was last served, written to the index in batches
        self._access = AccessTimes(db)
        #: what :meth:`confirm_lookups` knows of other processes' changes to the index
        self._watch = IndexWatch(db, self.cache)
        self._stored_listeners: list[Callable[[], None]] = []

    # --- plumbing ---------------------------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    async def open(self, *, sweep: bool = True) -> None:
        """Open store and index; ``sweep`` (the daemon's start-up, not the tools beside a live
        daemon: import, prefetch, pin) removes what a crash left."""
        removed = await self._io(self.store.open, sweep=sweep)
        await self.db.open()
        if sweep:  # the spares of writers killed before their settle (regproxy.removal)
            spares = await settle_spares(self.store, lambda d: self.db.read(Index.stored_among, d))
            removed += len(spares)
        cleared = await self.db.write(Index.clear_uploads) if sweep else 0
        log.info(
            "registry.open root=%s swept_tmp=%d cleared_uploads=%d",
            self.store.root,
            removed,
            cleared,
        )

    async def close(self) -> None:
        self.uploads.close()
        await self.flush_access()
        await self.db.close()

    def _touch(self, repo: str, digest: str) -> None:
        if not PROBE.get():
            self._access.note(repo, digest)

    def pending_access(self) -> AbstractSet[str]:
        """Digests served and not yet written (eviction keeps them: in use): a live view."""
        return self._access.pending()

    def unflushed_access(self) -> Mapping[tuple[str, str], float]:
        """When each (repository, digest) not yet written was last served (the web page shows
        these over the index's times instead of waiting for the write)."""
        return self._access.unflushed()

    async def flush_access(self) -> None:
        await self._access.flush()

    async def confirm_lookups(self) -> None:
        """Confirm the cached tags, unless another process changed the index (then every
        cached lookup goes): see :mod:`regproxy.lookup_confirm`. Called about twice a second
        while serving, so a tag asked for again and again costs no index read."""
        await self._watch.check()

    async def ensure_repo(self, name: RepoName) -> None:
        """The repository's row (written with the first content stored under the name)."""
        await self.db.write(Index.ensure_repo, name.canonical, name.host, name.path)

    # --- blobs ------------------------------------------------------------------------------------
    async def local_blob(self, repo: RepoName, digest: Digest) -> Blob | None:
        """The blob if this repository has it committed, else None. Usually no I/O at all."""
        size = self.cache.link(repo.canonical, str(digest))
        if size is None:
            ticket = self.cache.ticket()
            size = await self.db.read(Index.blob_in_repo, repo.canonical, str(digest))
            if size is None:
                return None
            self.cache.put_link(repo.canonical, str(digest), size, ticket)
        self._touch(repo.canonical, str(digest))
        if size <= SMALL_OBJECT:
            data = self.cache.body(str(digest))
            if data is None:
                try:
                    data = await self._io(self.store.read, digest)
                except FileNotFoundError:
                    await self._lost(repo, digest)
                    return None
                self.cache.put_body(str(digest), data)
            return Blob(digest, size, data=data)
        return Blob(digest, size, file=self.store.blob_path(digest))

    def cached_blob(self, repo: RepoName, digest: Digest, files: bool = False) -> Blob | None:
        """What :meth:`local_blob` answers when all it needs is in memory: a blob this
        repository holds, a small one with its bytes cached, (``files``) a larger one by its
        file (the access recorded); None otherwise."""
        key = str(digest)
        size = self.cache.link(repo.canonical, key)
        if size is None or (size > SMALL_OBJECT and not files):
            return None
        if size > SMALL_OBJECT:
            self._touch(repo.canonical, key)
            return Blob(digest, size, file=self.store.blob_path(digest))
        data = self.cache.body(key)
        if data is None:
            return None
        self._touch(repo.canonical, key)
        return Blob(digest, size, data=data)

    async def forget_lost_blob(self, repo: RepoName, digest: Digest) -> None:
        """A blob file the index listed was not on disk when it was opened."""
        await self._lost(repo, digest)

    async def _lost(self, repo: RepoName, digest: Digest) -> None:
        """The index says we have it but the file is gone (fsck, manual damage): forget it;
        unless a removal has it moved out, to put it back (regproxy.removal)."""
        self.cache.forget(links=[(repo.canonical, str(digest))])
        if not await self._io(self.store.missing, digest):
            log.info("blob.gone_since_lookup digest=%s repo=%s", digest, repo)
            return None
        log.warning("store.missing digest=%s repo=%s", digest, repo)
        await self.db.write(Index.unlink_blob, repo.canonical, str(digest))
        return None

    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob:
        blob = await self.local_blob(repo, digest)
        if blob is None:
            raise BlobUnknown(str(digest))
        return blob

    async def delete_blob(self, repo: RepoName, digest: Digest) -> None:
        key = (repo.canonical, str(digest))
        self.cache.forget(links=[key])  # and a lookup out meanwhile does not cache it again
        gone = await self.db.write(Index.unlink_blob, repo.canonical, str(digest))
        self.cache.forget(links=[key])
        if not gone:
            raise BlobUnknown(str(digest))

    async def mount_blob(self, repo: RepoName, digest: Digest, source: RepoName | None) -> bool:
        """Cross-repository mount; without a source, any repository's copy will do."""
        if (
            source is not None
            and await self.db.read(Index.blob_in_repo, source.canonical, str(digest)) is None
        ):
            return False
        if await self._io(self.store.stat, digest) is None:
            return False
        await self.ensure_repo(repo)
        return await self.db.write(Index.link_blob, repo.canonical, str(digest)) is not None

    async def commit_blob(
        self, repo: RepoName, writer: BlobWriter, digest: Digest, source: str = ""
    ) -> int:
        """Verify and move a written temp file into place, then index it (durability order)."""
        try:
            size = await self._io(writer.commit, digest, source=source)
        except DigestMismatch as exc:
            raise DigestInvalid(str(digest), f"content hashes to {exc.actual}") from None
        try:
            await self.index_blob(repo, digest, size)
        finally:  # the file is still in place, else the row goes (regproxy.settling)
            await settle_row(self.db, self.cache, self.store, repo.canonical, digest, writer.settle)
        return size

    async def index_blob(self, repo: RepoName, digest: Digest, size: int) -> None:
        """Record a blob that is durable in the store as part of a repository (import)."""
        await self.ensure_repo(repo)
        await self.db.write(Index.add_blob, repo.canonical, str(digest), size)
        self.cache.put_link(repo.canonical, str(digest), size)
        self._stored()

    # --- manifests ------------------------------------------------------------------------------
    async def local_manifest(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None:
        """(row, checked) for a tag or digest held locally; checked is 0 for digests."""
        found = self.cached_manifest_row(repo, reference)
        if found is not None:
            return found
        ticket = self.cache.ticket()
        by_digest = is_digest_reference(reference)
        now = time.monotonic()
        # the row and (a small manifest's) body in one hand-off: a first lookup made two (the
        # row on a reader, the body on the executor), and at scale those were most of its cost
        row, body = await self.db.read(
            _row_and_body, self.store, repo.canonical, reference, by_digest
        )
        if row is None:
            return None
        if body is not None:
            self.cache.put_body(row.digest, body)
        if by_digest:
            self.cache.put_manifest(repo.canonical, reference, row, ticket)
            return row, 0.0
        self.cache.put_tag(repo.canonical, reference, row, now, ticket)
        return row, row.checked

    def cached_manifest_row(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None:
        """What :meth:`local_manifest` answers when the answer is in memory; None otherwise
        (not cached, a tag not believed any more, or not held: ask :meth:`local_manifest`)."""
        if is_digest_reference(reference):
            row = self.cache.manifest(repo.canonical, reference)
            return None if row is None else (row, 0.0)
        row = self.cache.tag(repo.canonical, reference, time.monotonic())
        return None if row is None else (row, row.checked)

    def cached_manifest(self, repo: RepoName, row: ManifestRow) -> Manifest | None:
        """What :meth:`manifest_body` answers when the body is in memory (None otherwise);
        the access is recorded as that of a served manifest."""
        body = self.cache.body(row.digest)
        if body is None:
            return None
        self._touch(repo.canonical, row.digest)
        return Manifest(Digest.parse(row.digest), row.media_type, row.size, body)

    async def manifest_body(self, repo: RepoName, row: ManifestRow) -> Manifest:
        cached = self.cached_manifest(repo, row)
        if cached is not None:
            return cached
        digest = Digest.parse(row.digest)
        try:
            body = await self._io(self.store.read, digest)
        except FileNotFoundError:
            await self._manifest_gone(repo, row.digest)
            raise ManifestGone(row.digest) from None
        self.cache.put_body(row.digest, body)
        self._touch(repo.canonical, row.digest)
        return Manifest(digest, row.media_type, row.size, body)

    async def _manifest_gone(self, repo: RepoName, digest: str) -> None:
        """The file of a manifest just looked up is not there: evicted since the lookup (its row
        went first), or lost (the row is still there: forget it, as a lost blob is). Either way
        every cached lookup of it goes, so the next lookup misses."""
        self.cache.forget(manifests=[(repo.canonical, digest)], tags_of=[repo.canonical])
        held = await self.db.read(Index.manifest_in_repo, repo.canonical, digest) is not None
        if held and await self._io(self.store.missing, Digest.parse(digest)):
            log.warning("store.missing manifest=%s repo=%s", digest, repo)
            await self.db.write(Index.delete_manifest, repo.canonical, digest)
        else:
            log.info("manifest.gone_since_lookup digest=%s repo=%s", digest, repo)

    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest:
        found = await self.local_manifest(repo, reference)
        if found is None:
            raise ManifestUnknown(reference)
        return await self.manifest_body(repo, found[0])

    async def head_blob(self, repo: RepoName, digest: Digest) -> Blob:
        """What a HEAD answers with: what this host holds."""
        return await self.get_blob(repo, digest)

    async def put_manifest(
        self,
        repo: RepoName,
        reference: str,
        body: bytes,
        content_type: str | None,
        *,
        verify_refs: bool = True,
        pinned: bool = True,
        checked: float | None = None,
    ) -> PutResult:
        """Store a manifest's exact bytes; a tag moves only after the manifest is durable."""
        if is_digest_reference(reference):
            want = Digest.parse(reference)
            digest = Digest.of(body, want.algorithm)
            if digest != want:
                raise DigestInvalid(reference, f"manifest body hashes to {digest}")
            tag = None
        else:
            tag = validate_tag(reference)
            digest = Digest.of(body)
        parsed = await parse_manifest_async(body, content_type)
        if verify_refs:
            if self._settle is not None:
                await self._settle(repo, [b.digest for b in parsed.blobs])
            missing = await self.db.read(
                Index.missing_blobs, repo.canonical, [str(b.digest) for b in parsed.blobs]
            )
            if missing:
                raise ManifestBlobUnknown(missing[0])
            children = [str(m.digest) for m in parsed.manifests]
            missing = await self.db.read(Index.missing_manifests, repo.canonical, children)
            if missing:
                raise ManifestBlobUnknown(missing[0])
        added = await manifest_put.add(
            self.store,
            self.db,
            repo,
            digest,
            body,
            parsed,
            tag=tag,
            pinned=pinned,
            checked=checked,
            verify_refs=verify_refs,
        )
        settle = functools.partial(self.store.ensure_bytes, data=body)  # regproxy.settling
        await settle_row(
            self.db, self.cache, self.store, repo.canonical, digest, settle, manifest=added
        )
        self.cache.put_body(str(digest), body)
        self._stored()
        if tag is not None:
            self.cache.forget(tags=[(repo.canonical, tag)])
        return PutResult(digest, parsed.subject.digest if parsed.subject else None)

    async def store_pulled(
        self, repo: RepoName, reference: str, body: bytes, media_type: str, checked: float
    ) -> Manifest:
        """A manifest pulled from elsewhere (an upstream, a peer): stored as it came, unpinned,
        without a reference check (its blobs come when asked for); returned as it is served."""
        result = await self.put_manifest(
            repo, reference, body, media_type, verify_refs=False, pinned=False, checked=checked
        )
        row = await self.local_manifest(repo, str(result.digest))
        assert row is not None
        return await self.manifest_body(repo, row[0])

    async def mark_tag_checked(
        self, repo: RepoName, tag: str, checked: float | None = None
    ) -> None:
        """The tag was confirmed upstream at ``checked`` (wall clock; now by default)."""
        when = time.time() if checked is None else checked
        await self.db.write(Index.set_tag_checked, repo.canonical, tag, when)
        self.cache.forget(tags=[(repo.canonical, tag)])

    async def delete_manifest(self, repo: RepoName, reference: str) -> None:
        if is_digest_reference(reference):
            key = (repo.canonical, reference)
            # and lookups out meanwhile do not cache it again
            self.cache.forget(manifests=[key], tags_of=[repo.canonical])
            gone = await self.db.write(Index.delete_manifest, repo.canonical, reference)
            self.cache.forget(manifests=[key], tags_of=[repo.canonical])
            if not gone:
                raise ManifestUnknown(reference)
            return
        validate_tag(reference)
        self.cache.forget(tags=[(repo.canonical, reference)])
        gone = await self.db.write(Index.delete_tag, repo.canonical, reference)
        self.cache.forget(tags=[(repo.canonical, reference)])
        if not gone:
            raise ManifestUnknown(reference)

    # --- listings -------------------------------------------------------------------------------------
    async def repo_exists(self, repo: RepoName) -> bool:
        return await self.db.read(Index.repo_exists, repo.canonical)

    async def list_tags(self, repo: RepoName, n: int | None, last: str | None) -> list[str]:
        if not await self.repo_exists(repo):
            raise NameUnknown(repo.canonical)
        return await self.db.read(Index.list_tags, repo.canonical, n, last)

    async def catalog(self, n: int | None, last: str | None) -> list[str]:
        return await self.db.read(Index.catalog, n, last)

    async def referrers(
        self, repo: RepoName, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]:
        rows = await self.db.read(Index.referrers, repo.canonical, str(subject))
        out = []
        for r in rows:
            if artifact_type and r.artifact_type != artifact_type:
                continue
            out.append(
                Descriptor(
                    r.media_type, Digest.parse(r.digest), r.size, r.artifact_type, r.annotations
                )
            )
        return out

    def subscribe_stored(self, callback: Callable[[], None]) -> None:
        """``callback()`` after new content is indexed (eviction checks its limits soon)."""
        self._stored_listeners.append(callback)

    def _stored(self) -> None:
        for callback in self._stored_listeners:
            callback()


class Registry(Protocol):
    """What the HTTP layer and the tools ask of a registry (:class:`LocalRegistry`, or
    :class:`regproxy.proxy.ProxyRegistry` around one)."""

    @property
    def store(self) -> Store: ...
    @property
    def db(self) -> AsyncIndex: ...
    @property
    def uploads(self) -> UploadSessions: ...
    @property
    def cache(self) -> LookupCache: ...
    @property
    def metrics(self) -> Metrics: ...

    async def open(self, *, sweep: bool = True) -> None: ...
    async def close(self) -> None: ...
    def pending_access(self) -> AbstractSet[str]: ...
    def unflushed_access(self) -> Mapping[tuple[str, str], float]: ...
    async def flush_access(self) -> None: ...
    async def confirm_lookups(self) -> None: ...
    async def local_blob(self, repo: RepoName, digest: Digest) -> Blob | None: ...
    async def forget_lost_blob(self, repo: RepoName, digest: Digest) -> None: ...
    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob: ...
    async def head_blob(self, repo: RepoName, digest: Digest) -> Blob: ...
    async def delete_blob(self, repo: RepoName, digest: Digest) -> None: ...
    async def mount_blob(self, repo: RepoName, digest: Digest, source: RepoName | None) -> bool: ...
    async def commit_blob(
        self, repo: RepoName, writer: BlobWriter, digest: Digest, source: str = ""
    ) -> int: ...
    async def index_blob(self, repo: RepoName, digest: Digest, size: int) -> None: ...
    async def local_manifest(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None: ...
    async def manifest_body(self, repo: RepoName, row: ManifestRow) -> Manifest: ...
    async def get_manifest(self, repo: RepoName, reference: str) -> Manifest: ...
    async def put_manifest(
        self,
        repo: RepoName,
        reference: str,
        body: bytes,
        content_type: str | None,
        *,
        verify_refs: bool = True,
        pinned: bool = True,
        checked: float | None = None,
    ) -> PutResult: ...
    async def mark_tag_checked(
        self, repo: RepoName, tag: str, checked: float | None = None
    ) -> None: ...
    async def delete_manifest(self, repo: RepoName, reference: str) -> None: ...
    async def repo_exists(self, repo: RepoName) -> bool: ...
    async def list_tags(self, repo: RepoName, n: int | None, last: str | None) -> list[str]: ...
    async def catalog(self, n: int | None, last: str | None) -> list[str]: ...
    async def referrers(
        self, repo: RepoName, subject: Digest, artifact_type: str | None
    ) -> list[Descriptor]: ...
    def subscribe_stored(self, callback: Callable[[], None]) -> None: ...


__all__ = ["Blob", "BlobUploadInvalid", "Manifest", "ManifestInvalid", "Registry"]
