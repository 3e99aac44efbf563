"""The registry: OCI semantics over the store and the index. Knows no HTTP.

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
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

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
    RangeNotSatisfiable,
)
from regproxy.index import Index, ManifestRecord, ManifestRow
from regproxy.names import RepoName
from regproxy.oci import Descriptor, Digest, is_digest_reference, parse_manifest, validate_tag
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
SMALL_CACHE_BYTES: Final = 32 * 1024 * 1024
TAG_CACHE_SECONDS: Final = 1.0  # another process (import, gc) may move a tag


class LRU(Generic[K, V]):
    """A small bounded LRU map, by entry count and optionally by a weight."""

    def __init__(self, max_entries: int, max_weight: int = 0) -> None:
        self._d: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.max_entries = max_entries
        self.max_weight = max_weight
        self.weight = 0

    def get(self, key: K) -> V | None:
        item = self._d.get(key)
        if item is None:
            return None
        self._d.move_to_end(key)
        return item[0]

    def put(self, key: K, value: V, weight: int = 0) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.weight -= old[1]
        self._d[key] = (value, weight)
        self.weight += weight
        while len(self._d) > self.max_entries or (
            self.max_weight and self.weight > self.max_weight
        ):
            _, (_, w) = self._d.popitem(last=False)
            self.weight -= w

    def pop(self, key: K) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.weight -= old[1]

    def drop_where(self, pred: Callable[[K], bool]) -> None:
        for k in [k for k in self._d if pred(k)]:
            self.pop(k)

    def clear(self) -> None:
        self._d.clear()
        self.weight = 0


class ManifestGone(ManifestUnknown):
    """A manifest's file went between its lookup and the read (evicted, or lost): for a local
    repository a 404 like any unknown manifest; a pull-through looks it up again (a miss)."""


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


class Registry:
    def __init__(
        self, store: Store, db: AsyncIndex, *, max_upload_sessions: int = DEFAULT_MAX_SESSIONS
    ) -> None:
        self.store = store
        #: the index, for every module: ``await registry.db.read(Index.x, ...)`` / ``.write``
        self.db = db
        #: blob upload sessions (regproxy.uploads); their commits go through :meth:`commit_blob`
        self.uploads = UploadSessions(store, db, self.commit_blob, max_upload_sessions)
        self._small: LRU[str, bytes] = LRU(100_000, SMALL_CACHE_BYTES)
        self._blob_links: LRU[tuple[str, str], int] = LRU(200_000)
        self._manifests: LRU[tuple[str, str], ManifestRow] = LRU(50_000)
        self._tags: LRU[tuple[str, str], tuple[ManifestRow, float]] = LRU(50_000)
        self._access: dict[tuple[str, str], float] = {}
        self._stored_listeners: list[Callable[[], None]] = []

    # --- plumbing ---------------------------------------------------------------------------------
    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    async def open(self, *, sweep: bool = True) -> None:
        """Open store and index; ``sweep`` (the daemon's start-up) removes what a crash left.

        Tools that run beside a live daemon (import, prefetch, pin) open with ``sweep=False``.
        """
        removed = await self._io(self.store.open, sweep=sweep)
        await self.db.open()
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
            self._access[(repo, digest)] = time.time()

    def pending_access(self) -> set[str]:
        """Digests served since the last :meth:`flush_access` (eviction keeps them: in use)."""
        return {d for _, d in self._access}

    async def flush_access(self) -> None:
        if not self._access:
            return
        items = [(r, d, t) for (r, d), t in self._access.items()]
        self._access = {}
        await self.db.write(Index.touch, items)

    async def _ensure_repo(self, name: RepoName) -> None:
        await self.db.write(Index.ensure_repo, name.canonical, name.host, name.path)

    # --- blobs ------------------------------------------------------------------------------------
    async def local_blob(self, repo: RepoName, digest: Digest) -> Blob | None:
        """The blob if this repository has it committed, else None. Usually no I/O at all."""
        key = (repo.canonical, str(digest))
        size = self._blob_links.get(key)
        if size is None:
            size = await self.db.read(Index.blob_in_repo, repo.canonical, str(digest))
            if size is None:
                return None
            self._blob_links.put(key, size)
        self._touch(repo.canonical, str(digest))
        if size <= SMALL_OBJECT:
            data = self._small.get(str(digest))
            if data is None:
                try:
                    data = await self._io(self.store.read, digest)
                except FileNotFoundError:
                    await self._lost(repo, digest)
                    return None
                self._small.put(str(digest), data, len(data))
            return Blob(digest, size, data=data)
        return Blob(digest, size, file=self.store.blob_path(digest))

    async def forget_lost_blob(self, repo: RepoName, digest: Digest) -> None:
        """A blob file the index listed was not on disk when it was opened."""
        await self._lost(repo, digest)

    async def _lost(self, repo: RepoName, digest: Digest) -> None:
        """The index says we have it but the file is gone (fsck, manual damage): forget it."""
        log.warning("store.missing digest=%s repo=%s", digest, repo)
        self._blob_links.pop((repo.canonical, str(digest)))
        await self.db.write(Index.unlink_blob, repo.canonical, str(digest))
        return None

    async def get_blob(self, repo: RepoName, digest: Digest) -> Blob:
        blob = await self.local_blob(repo, digest)
        if blob is None:
            raise BlobUnknown(str(digest))
        return blob

    async def delete_blob(self, repo: RepoName, digest: Digest) -> None:
        key = (repo.canonical, str(digest))
        self._blob_links.pop(key)
        gone = await self.db.write(Index.unlink_blob, repo.canonical, str(digest))
        self._blob_links.pop(key)  # a lookup queued before the delete may have cached it again
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
        await self._ensure_repo(repo)
        return await self.db.write(Index.link_blob, repo.canonical, str(digest)) is not None

    async def commit_blob(
        self, repo: RepoName, writer: BlobWriter, digest: Digest, source: str = ""
    ) -> int:
        """Verify and move a written temp file into place, then index it (durability order)."""
        try:
            size = await self._io(writer.commit, digest, source=source)
        except DigestMismatch as exc:
            raise DigestInvalid(str(digest), f"content hashes to {exc.actual}") from None
        await self._ensure_repo(repo)
        await self.db.write(Index.add_blob, repo.canonical, str(digest), size)
        self._blob_links.put((repo.canonical, str(digest)), size)
        self._stored()
        return size

    async def index_blob(self, repo: RepoName, digest: Digest, size: int) -> None:
        """Record a blob that is durable in the store as part of a repository (import)."""
        await self._ensure_repo(repo)
        await self.db.write(Index.add_blob, repo.canonical, str(digest), size)
        self._blob_links.put((repo.canonical, str(digest)), size)
        self._stored()

    # --- manifests ------------------------------------------------------------------------------
    async def local_manifest(
        self, repo: RepoName, reference: str
    ) -> tuple[ManifestRow, float] | None:
        """(row, checked) for a tag or digest held locally; checked is 0 for digests."""
        if is_digest_reference(reference):
            key = (repo.canonical, reference)
            row = self._manifests.get(key)
            if row is None:
                row = await self.db.read(Index.manifest_in_repo, repo.canonical, reference)
                if row is None:
                    return None
                self._manifests.put(key, row)
            return row, 0.0
        now = time.monotonic()
        cached = self._tags.get((repo.canonical, reference))
        if cached is not None and now - cached[1] < TAG_CACHE_SECONDS:
            return cached[0], cached[0].checked
        row = await self.db.read(Index.resolve_tag, repo.canonical, reference)
        if row is None:
            self._tags.pop((repo.canonical, reference))
            return None
        self._tags.put((repo.canonical, reference), (row, now))
        return row, row.checked

    async def manifest_body(self, repo: RepoName, row: ManifestRow) -> Manifest:
        digest = Digest.parse(row.digest)
        body = self._small.get(row.digest)
        if body is None:
            try:
                body = await self._io(self.store.read, digest)
            except FileNotFoundError:
                await self._manifest_gone(repo, row.digest)
                raise ManifestGone(row.digest) from None
            self._small.put(row.digest, body, len(body))
        self._touch(repo.canonical, row.digest)
        return Manifest(digest, row.media_type, row.size, body)

    async def _manifest_gone(self, repo: RepoName, digest: str) -> None:
        """The file of a manifest just looked up is not there: evicted since the lookup (its row
        went first), or lost (the row is still there: forget it, as a lost blob is). Either way
        every cached lookup of it goes, so the next lookup misses."""
        self._manifests.pop((repo.canonical, digest))
        self._tags.drop_where(lambda k: k[0] == repo.canonical)
        held = await self.db.read(Index.manifest_in_repo, repo.canonical, digest) is not None
        if held and await self._io(self.store.stat, Digest.parse(digest)) is None:
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
        """What a HEAD answers with (a subclass may ask elsewhere without fetching)."""
        return await self.get_blob(repo, digest)

    async def _blobs_settled(self, repo: RepoName, digests: list[Digest]) -> None:
        """Before a manifest's references are checked: a subclass may wait for blobs still on
        their way into the store (pull-through). Nothing is in flight here."""

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
        parsed = parse_manifest(body, content_type)
        if verify_refs:
            await self._blobs_settled(repo, [b.digest for b in parsed.blobs])
            missing = await self.db.read(
                Index.missing_blobs, repo.canonical, [str(b.digest) for b in parsed.blobs]
            )
            if missing:
                raise ManifestBlobUnknown(missing[0])
            children = [str(m.digest) for m in parsed.manifests]
            missing = await self.db.read(Index.missing_manifests, repo.canonical, children)
            if missing:
                raise ManifestBlobUnknown(missing[0])
        await self._io(self.store.write_bytes, digest, body)
        await self._ensure_repo(repo)
        rec = ManifestRecord(
            digest=str(digest),
            media_type=parsed.media_type,
            size=len(body),
            artifact_type=parsed.artifact_type,
            subject=str(parsed.subject.digest) if parsed.subject else None,
            annotations=parsed.annotations or None,
            blobs=[str(b.digest) for b in parsed.blobs],
            children=[str(m.digest) for m in parsed.manifests],
        )
        await self.db.write(
            Index.add_manifest, repo.canonical, rec, tag=tag, pinned=pinned, checked=checked
        )
        self._small.put(str(digest), body, len(body))
        self._stored()
        if tag is not None:
            self._tags.pop((repo.canonical, tag))
        return PutResult(digest, parsed.subject.digest if parsed.subject else None)

    async def mark_tag_checked(
        self, repo: RepoName, tag: str, checked: float | None = None
    ) -> None:
        """The tag was confirmed upstream at ``checked`` (wall clock; now by default)."""
        when = time.time() if checked is None else checked
        await self.db.write(Index.set_tag_checked, repo.canonical, tag, when)
        self._tags.pop((repo.canonical, tag))

    async def delete_manifest(self, repo: RepoName, reference: str) -> None:
        if is_digest_reference(reference):
            self._manifests.pop((repo.canonical, reference))
            self._tags.drop_where(lambda k: k[0] == repo.canonical)
            gone = await self.db.write(Index.delete_manifest, repo.canonical, reference)
            # lookups queued on the index thread before the delete may have cached it again
            self._manifests.pop((repo.canonical, reference))
            self._tags.drop_where(lambda k: k[0] == repo.canonical)
            if not gone:
                raise ManifestUnknown(reference)
            return
        validate_tag(reference)
        self._tags.pop((repo.canonical, reference))
        gone = await self.db.write(Index.delete_tag, repo.canonical, reference)
        self._tags.pop((repo.canonical, reference))
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

    # --- eviction, gc, fsck (regproxy.evict) -----------------------------------------------------
    def drop_cached(
        self,
        rows: Iterable[tuple[str, str]] | None = None,
        digests: Iterable[str] | None = None,
        *,
        tags: Iterable[tuple[str, str]] = (),
        links: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Forget cached lookups of what eviction removed: repository manifest rows, deleted
        digests, (repo, tag) and (repo, blob) pairs; each by its key (no walk over a cache).

        Without arguments everything cached goes (another process changed the index).
        """
        if rows is None and digests is None:
            for cache in (self._small, self._blob_links, self._manifests, self._tags):
                cache.clear()
            return
        for key in rows or ():
            self._manifests.pop(key)
        for digest in digests or ():
            self._small.pop(digest)
        for key in tags:
            self._tags.pop(key)
        for key in links:
            self._blob_links.pop(key)

    def subscribe_stored(self, callback: Callable[[], None]) -> None:
        """``callback()`` after new content is indexed (eviction checks its limits soon)."""
        self._stored_listeners.append(callback)

    def _stored(self) -> None:
        for callback in self._stored_listeners:
            callback()


def check_range(size: int, start: int, end: int | None) -> tuple[int, int]:
    """Clamp a single byte range to a blob; raise RangeNotSatisfiable when it lies outside."""
    if start >= size or (end is not None and end < start):
        raise RangeNotSatisfiable(
            f"bytes {start}-{'' if end is None else end} of {size}", size=size
        )
    last = size - 1 if end is None else min(end, size - 1)
    return start, last


__all__ = ["Blob", "BlobUploadInvalid", "Manifest", "ManifestInvalid", "Registry", "check_range"]
