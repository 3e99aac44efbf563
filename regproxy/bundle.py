"""Content bundles in: OCI layouts and archives, and ``docker save`` archives.

Import in three phases, so a damaged bundle leaves nothing behind:

1. *stage* (:mod:`regproxy.bundle_stage`): every file of the bundle is streamed once (never whole
   in memory) into a temp file of the store while it is hashed; a blob whose bytes do not match
   its name is refused there.
2. *check*: every image's graph (index -> manifests -> config and layers) is resolved against
   what was staged and what the store already holds, and held to what the bundle claims: each
   descriptor's digest, size and media type (index.json's included) must be what the bytes are;
   a docker archive is held to its file names and its configs' ``rootfs.diff_ids``
   (:mod:`regproxy.bundle_docker`). A missing or lying piece is refused, naming the image and
   the digest.
3. *commit*: only then are blobs moved into place and indexed, children before parents, and
   tags last (the store's durability order); everything imported is pinned.

A blob the store already held when it was staged is not written again: the import relies on
the store's copy, which eviction (or ``regproxy gc``) may remove before the manifests that need
it are committed. So such a blob is only linked while the index still stores it (never indexed
again by the import: its file may be on its way out), and each manifest is added in the same
write transaction that checks its blobs are there (``Index.add_manifest(verify_refs=True)``):
a manifest is never committed without its blobs, and once committed (pinned) nothing of it is
evicted. A blob gone meanwhile makes the import run once more, staging it from the bundle this
time; gone again, the import fails, naming the blob, with nothing that needs it committed.

Staged files that were not needed are removed whatever happens.
Export (an OCI archive out) is :mod:`regproxy.bundle_export`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regproxy.bundle_docker import images_from_docker
from regproxy.bundle_export import Exporter, ExportImage, full_reference
from regproxy.bundle_stage import (
    CONTAINERD_NAME,
    REF_NAME,
    BundleError,
    Image,
    Progress,
    Room,
    Stage,
    image_for,
    stage_path,
)
from regproxy.errors import ManifestBlobUnknown, OCIError, StorageFull
from regproxy.index import ManifestRow
from regproxy.names import NameResolver, RepoName
from regproxy.oci import MANIFEST_TYPES, Digest, ParsedManifest, parse_manifest
from regproxy.policy import ImportedImage, Policy
from regproxy.registry import Registry
from regproxy.settling import PutBackFull, settle_row
from regproxy.space import Space
from regproxy.store import BlobWriter
from regproxy.units import BULK_CHUNK
from regproxy.uploads import Room as BodyRoom

log = logging.getLogger("regproxy.bundle")
#: runs of one import when blobs it relied on were evicted meanwhile (the later ones stage them)
ATTEMPTS = 2


class _Gone(Exception):
    """Blobs the store held when they were staged, evicted (or gc'd) before the commit."""

    def __init__(self, digests: set[Digest], summary: ImportSummary) -> None:
        super().__init__(digests)
        self.digests = digests
        self.summary = summary  # what the run committed before it stopped


class ImportStopped(StorageFull):
    """The disk filled (the index, most likely) while a bundle was committed: 507 as any full
    disk, its detail naming the images imported before it (``summary``) and those not
    (``left``: an image cut midway may have some of its blobs stored, unreferenced)."""

    def __init__(self, cause: StorageFull, summary: ImportSummary, left: list[str]) -> None:
        super().__init__(
            f"{cause.detail}; imported before it: {_listed(summary.images)}; "
            f"not imported: {_listed(left)}"
        )
        self.cause, self.summary, self.left = cause, summary, left


def _listed(names: list[str], show: int = 5) -> str:
    shown = ", ".join(names[:show]) + (
        f", and {len(names) - show} more" if len(names) > show else ""
    )
    return f"{len(names)} image(s)" + (f" ({shown})" if names else "")


@dataclass
class ImportSummary:
    images: list[str] = field(default_factory=list)
    manifests_new: int = 0
    blobs_new: int = 0
    blobs_present: int = 0
    bytes_new: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "manifests_new": self.manifests_new,
            "blobs_new": self.blobs_new,
            "blobs_present": self.blobs_present,
            "bytes_new": self.bytes_new,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "nothing_new": self.blobs_new == 0 and self.manifests_new == 0,
        }

    def __str__(self) -> str:
        what = "nothing new" if self.blobs_new == 0 and self.manifests_new == 0 else "imported"
        return (
            f"{what}: {len(self.images)} image(s), {self.manifests_new} new manifest(s), "
            f"{self.blobs_new} new blob(s) ({self.bytes_new} bytes), "
            f"{self.blobs_present} already present, in {self.seconds:.1f}s"
        )


def _images_from_oci(stage: Stage, resolver: NameResolver, override: str | None) -> list[Image]:
    index = stage.json_of("index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise BundleError("the bundle has no usable index.json")
    images = []
    for i, desc in enumerate(index["manifests"]):
        where = f"index.json entry {i}"
        digest = Digest.parse(str(desc.get("digest", "")))
        size, media_type = desc.get("size"), desc.get("mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BundleError(f"{where} ({digest}) has no valid size")
        ann = desc.get("annotations") or {}
        ref = ann.get(CONTAINERD_NAME) or ann.get(REF_NAME)
        image = image_for(resolver, ref, override, digest, where)
        image.size = size
        image.media_type = media_type if isinstance(media_type, str) else None
        images.append(image)
    return images


def _images(
    stage: Stage, resolver: NameResolver, override: str | None
) -> tuple[list[Image], dict[Digest, bytes]]:
    """The bundle's images (and the manifests a docker archive needs made); blocking."""
    try:
        if "index.json" in stage.small:
            return _images_from_oci(stage, resolver, override), {}
        if "manifest.json" in stage.small:
            return images_from_docker(stage, resolver, override)
        raise BundleError("not a bundle: no index.json (OCI) and no manifest.json (docker save)")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # index.json / manifest.json of an unexpected shape: the bundle's fault, not ours
        raise BundleError(f"the bundle's index is malformed: {exc!r}") from None
    except OCIError as exc:  # a bad name or digest in the index
        raise BundleError(f"the bundle's index names something invalid: {exc}") from None


@dataclass
class _Graph:
    """What one image needs: manifests (children first) and blobs."""

    manifests: list[tuple[Digest, bytes, ParsedManifest]] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)


def _walk(stage: Stage, image: Image, extra: dict[Digest, bytes]) -> _Graph:
    """Resolve an image's graph, holding every descriptor to the bytes it names; blocking."""
    graph = _Graph()
    seen: set[Digest] = set()
    label = f"{image.repo.canonical}:{image.tag or image.top}"

    def claim(what: str, digest: Digest, said: int | None, actual: int) -> None:
        if said is not None and said != actual:
            raise BundleError(
                f"{label}: {what} says {digest} is {said} bytes, the bundle's is {actual}"
            )

    def visit(
        digest: Digest, size: int | None, media_type: str | None, by: str, depth: int
    ) -> None:
        if digest in seen:
            return
        seen.add(digest)
        if depth > 4:
            raise BundleError(f"{label}: manifests nest too deep at {digest}")
        if digest in extra:
            body = extra[digest]
        elif stage.has(digest):
            body = stage.bytes_of(digest)
        else:
            raise BundleError(f"{label}: manifest {digest} is missing from the bundle")
        claim(by, digest, size, len(body))
        try:
            parsed = parse_manifest(body, None)
        except OCIError as exc:
            raise BundleError(f"{label}: manifest {digest} is invalid: {exc.detail}") from None
        except RecursionError:  # JSON nested deeper than the parser goes
            raise BundleError(f"{label}: manifest {digest} is invalid: nested too deep") from None
        if media_type in MANIFEST_TYPES and parsed.media_type != media_type:
            raise BundleError(
                f"{label}: {by} says {digest} is a {media_type}, the manifest is a "
                f"{parsed.media_type}"
            )
        for child in parsed.manifests:
            visit(child.digest, child.size, child.media_type, f"index {digest}", depth + 1)
        for blob in parsed.blobs:
            actual = stage.size_of(blob.digest)
            if actual is None:
                raise BundleError(f"{label}: blob {blob.digest} is missing from the bundle")
            claim(f"manifest {digest}", blob.digest, blob.size, actual)
            graph.blobs[blob.digest] = blob.size
        graph.manifests.append((digest, body, parsed))

    visit(image.top, image.size, image.media_type, "index.json", 0)
    return graph


class Importer:
    def __init__(
        self,
        registry: Registry,
        resolver: NameResolver,
        *,
        name: str | None = None,
        progress: Progress | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.name = name
        self.progress = progress
        #: the signature policy: with ``enforce: [import]`` an unsigned image refuses the bundle
        self.policy = policy

    @property
    def space(self) -> Space | None:
        """Room above ``storage.min_free``: the registry's (in the daemon, shared with its
        pulls and pushes and able to ask eviction; in ``regproxy import``, a process of its
        own, the filesystem's free bytes alone)."""
        return self.registry.uploads.space

    def _room(self, label: str, loop: asyncio.AbstractEventLoop) -> tuple[Room | None, object]:
        """The staging thread's room check (blocking, on the loop's Space), and its key."""
        space, key = self.space, object()
        if space is None:
            return None, key

        def room(path: str, size: int, written: Callable[[], int]) -> None:
            asyncio.run_coroutine_threadsafe(
                space.reserve_upload(
                    key, size, written, whole=size, repo=label, uid=path, kind="import"
                ),
                loop,
            ).result()

        return room, key

    async def import_path(self, path: Path, label: str | None = None) -> ImportSummary:
        """Import a bundle file or layout directory; each of its files reserves its room above
        ``storage.min_free`` before its first byte is staged (:class:`~regproxy.space.NoRoom`
        refuses the bundle then, with nothing of it committed). ``label``: the bundle's name
        in logs and refusals (the path by default)."""
        started = time.monotonic()
        restage: set[Digest] = set()
        done: ImportSummary | None = None  # what runs before this one committed
        for attempt in range(1, ATTEMPTS + 1):
            try:
                summary, bytes_read = await self._run(path, label, frozenset(restage))
                break
            except ImportStopped as stop:  # with what runs before this one committed
                if done is None:
                    raise
                summary = _add(done, stop.summary)
                summary.images += [i for i in done.images if i not in summary.images]
                left = [i for i in stop.left if i not in summary.images]
                raise ImportStopped(stop.cause, summary, left) from stop.cause
            except _Gone as gone:
                done = _add(done, gone.summary)
                restage |= gone.digests
                log.warning(
                    "import.blob_evicted path=%s digest=%s attempt=%d",
                    path,
                    ",".join(sorted(map(str, gone.digests))),
                    attempt,
                )
                if attempt == ATTEMPTS:
                    raise BundleError(
                        f"{label or path}: blob {min(map(str, gone.digests))} was evicted from "
                        f"the store while the import ran ({attempt} times): nothing that needs "
                        "it was committed; import the bundle again"
                    ) from None
        summary = _add(done, summary)
        summary.seconds = time.monotonic() - started
        summary.bytes_read = bytes_read
        log.info(
            "import.done path=%s images=%d blobs_new=%d blobs_present=%d bytes_new=%d seconds=%.1f",
            path,
            len(summary.images),
            summary.blobs_new,
            summary.blobs_present,
            summary.bytes_new,
            summary.seconds,
        )
        return summary

    async def _run(
        self, path: Path, label: str | None, restage: frozenset[Digest]
    ) -> tuple[ImportSummary, int]:
        """One run of an import: stage, check, commit. ``restage``: blobs to stage from the
        bundle even though the store has them (a run before found them evicted)."""
        loop = asyncio.get_running_loop()
        room, key = self._room(label or str(path), loop)
        stage = Stage(self.registry.store, self.progress, room, restage)
        # a thread of its own: its room checks wait for the event loop, whose own blocking
        # work (statvfs, the index) must find the default executor free
        staging = ThreadPoolExecutor(1, thread_name_prefix="import")
        try:
            await loop.run_in_executor(staging, stage_path, stage, path)
            if self.space is not None:
                self.space.release(key)  # staged: the files are in the free bytes now
            summary = await self._commit(stage, loop)
        finally:
            if self.space is not None:
                self.space.release(key)
            await loop.run_in_executor(staging, stage.discard)
            staging.shutdown(wait=False)
        return summary, stage.bytes_read

    def check_name(self) -> None:
        """The ``name`` given is an image reference, or BundleError (before a byte is read)."""
        if self.name is None:
            return
        try:
            self.resolver.parse_reference(self.name)
        except OCIError as exc:
            raise BundleError(
                f"the name given with --name ({self.name!r}) is not an image reference: {exc}"
            ) from None

    @contextlib.asynccontextmanager
    async def receiving(self, length: int | None, label: str = "upload") -> AsyncIterator[Upload]:
        """An uploaded bundle's temp file and its room above ``storage.min_free``, reserved as
        a push's is: all of ``length`` (the request's, when it has one) on entry, before a byte
        of it is read (:class:`~regproxy.space.NoRoom`), else a step at a time as it arrives;
        :meth:`Upload.take` streams and imports it. The room and the file go on exit."""
        loop = asyncio.get_running_loop()
        writer = await loop.run_in_executor(None, self.registry.store.writer)
        room = BodyRoom(self.space, label, "-", writer, length, kind="import")
        try:
            await room.first()
            yield Upload(self, writer, room, label)
        finally:
            room.release()
            await loop.run_in_executor(None, writer.abort)

    async def import_stream(
        self, chunks: AsyncIterator[bytes], length: int | None = None, label: str = "upload"
    ) -> ImportSummary:
        """An uploaded bundle: streamed to a temp file of the store, imported, removed (see
        :meth:`receiving`); then its files reserve their room as they are staged."""
        async with self.receiving(length, label) as upload:
            return await upload.take(chunks)

    async def _commit(self, stage: Stage, loop: Any) -> ImportSummary:
        images, extra = await loop.run_in_executor(None, _images, stage, self.resolver, self.name)
        graphs = [await loop.run_in_executor(None, _walk, stage, img, extra) for img in images]
        if self.policy is not None:
            await self._check_policy(stage, images, graphs, loop)
        # everything is verified and complete: commit
        summary = ImportSummary()
        try:
            await self._commit_images(stage, images, graphs, extra, summary, loop)
        except PutBackFull:  # says itself that what was committed before it stays
            raise
        except StorageFull as exc:  # the index filled midway: say what is in and what is not
            left = [_name(img) for img in images[len(summary.images) :]]
            raise ImportStopped(exc, summary, left) from exc
        return summary

    async def _commit_images(
        self,
        stage: Stage,
        images: list[Image],
        graphs: list[_Graph],
        extra: dict[Digest, bytes],
        summary: ImportSummary,
        loop: Any,
    ) -> None:
        """Commit each image in turn (``summary.images`` lists those committed)."""
        committed: set[Digest] = set()
        for img, graph in zip(images, graphs, strict=True):
            gone = set()
            for digest, size in graph.blobs.items():
                if not await self._commit_blob(
                    stage, img.repo, digest, size, committed, summary, loop
                ):
                    gone.add(digest)
            if gone:
                raise _Gone(gone, summary)
            for digest, body, parsed in graph.manifests:
                is_top = digest == img.top
                ref = img.tag if (is_top and img.tag) else str(digest)
                before = await self.registry.local_manifest(img.repo, ref)
                try:
                    # its bytes are written from memory, and its row added only if its blobs
                    # are still stored, in the transaction that adds it
                    await self.registry.put_manifest(
                        img.repo, ref, body, parsed.media_type, verify_refs=True, pinned=True
                    )
                except ManifestBlobUnknown as exc:
                    raise _Gone({Digest.parse(str(exc.detail))}, summary) from None
                if digest not in extra:  # a bundle's manifest is a blob of the repository too
                    await self.registry.index_blob(img.repo, digest, len(body))
                if before is None or not _same(before[0], digest):
                    summary.manifests_new += 1
            summary.images.append(_name(img))

    async def _check_policy(
        self, stage: Stage, images: list[Image], graphs: list[_Graph], loop: Any
    ) -> None:
        """The policy's import check, before anything is committed (signatures from the
        bundle itself, or the store)."""
        assert self.policy is not None
        bundle = {str(d): body for g in graphs for d, body, _ in g.manifests}
        tags = {(i.repo.canonical, i.tag): str(i.top) for i in images if i.tag}
        tops = []
        for img, graph in zip(images, graphs, strict=True):
            for digest, body, parsed in graph.manifests:
                if digest == img.top:
                    label = f"{img.repo.canonical}{':' + img.tag if img.tag else '@' + str(digest)}"
                    tops.append(ImportedImage(img.repo, digest, body, parsed.media_type, label))

        async def read_blob(digest: str) -> bytes | None:
            d = Digest.parse(digest)
            if not stage.has(d):
                return None
            data: bytes = await loop.run_in_executor(None, stage.bytes_of, d)
            return data

        await self.policy.check_import(tops, bundle, tags, read_blob)

    async def _commit_blob(
        self,
        stage: Stage,
        repo: RepoName,
        digest: Digest,
        size: int,
        committed: set[Digest],
        summary: ImportSummary,
        loop: Any,
    ) -> bool:
        """Commit (or link) one blob into ``repo``; False: the store held it when it was
        staged and does not any more (evicted or gc'd meanwhile)."""
        staged = stage.blobs.get(digest)
        if staged is not None and staged.writer is not None:
            writer = staged.writer
            await loop.run_in_executor(None, lambda: writer.commit(digest, source="bundle"))
            staged.writer = None
            committed.add(digest)
            summary.blobs_new += 1
            summary.bytes_new += size
            try:
                await self.registry.index_blob(repo, digest, size)  # written just now
            finally:  # the file is still in place, else the row goes (regproxy.settling)
                reg = self.registry
                await settle_row(
                    reg.db, reg.cache, reg.store, repo.canonical, digest, writer.settle
                )
            return True
        if digest not in committed:
            summary.blobs_present += 1
            committed.add(digest)
        # not written by this import (or for an image before this one): linked only while the
        # index still stores it, never indexed again (its file may be on its way out)
        return await self.registry.mount_blob(repo, digest, None)


def _add(a: ImportSummary | None, b: ImportSummary) -> ImportSummary:
    """``b`` with the new content ``a`` (an earlier run of the same import) committed."""
    if a is not None:
        b.manifests_new += a.manifests_new
        b.blobs_new += a.blobs_new
        b.bytes_new += a.bytes_new
    return b


def _name(img: Image) -> str:
    return f"{img.repo.canonical}{':' + img.tag if img.tag else '@' + str(img.top)}"


def _same(row: ManifestRow, digest: Digest) -> bool:
    return row.digest == str(digest)


__all__ = [
    "BundleError",
    "ExportImage",
    "Exporter",
    "ImportStopped",
    "ImportSummary",
    "Importer",
    "full_reference",
]


@dataclass
class Upload:
    """A bundle on its way in over HTTP, its room held (:meth:`Importer.receiving`)."""

    importer: Importer
    writer: BlobWriter
    room: BodyRoom
    label: str

    async def take(self, chunks: AsyncIterator[bytes], label: str | None = None) -> ImportSummary:
        """Write the body to the temp file (room covered as it grows), then import it
        (``label``: the bundle's name in logs and refusals, once known)."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        received = 0
        async for chunk in chunks:
            buf += chunk
            received += len(chunk)
            await self.room.cover(received)
            if len(buf) >= BULK_CHUNK:
                data, buf = bytes(buf), bytearray()
                await loop.run_in_executor(None, self.writer.write, data)
        if buf:
            await loop.run_in_executor(None, self.writer.write, bytes(buf))
        self.writer.close()
        self.room.release()  # written: in the filesystem's free bytes from now on
        return await self.importer.import_path(self.writer.path, label or self.label)
