"""What a manifest ``PUT`` writes: its file, placed before its index row (the durability order)
and taken away again when the ``PUT`` is refused after that, so a refusal leaves no file for gc
to find; and the row's record.

A ``PUT`` checks its references, writes the manifest's file, then adds its row, checking the
references again in the row's transaction (a blob deleted or evicted meanwhile refuses it:
``MANIFEST_BLOB_UNKNOWN``); the index write itself may fail too (a full disk: 507). Either way no
row names the file this ``PUT`` placed. It is removed the way eviction removes files
(:mod:`regproxy.removal`), and only when

* this ``PUT`` put it there (a file that was there before is another writer's, or gc's), and
* no index row stores the digest, asked after the file moved out (the same manifest in another
  repository keeps its file; a writer of the same bytes in flight puts its own back once its
  row is in).
"""

from __future__ import annotations

import asyncio
import logging

from regproxy.async_index import AsyncIndex
from regproxy.errors import ManifestBlobUnknown
from regproxy.index import Index, ManifestAdded, ManifestRecord
from regproxy.names import RepoName
from regproxy.oci import Digest, ParsedManifest
from regproxy.removal import remove
from regproxy.store import Store

log = logging.getLogger("regproxy.registry")


def record(digest: Digest, parsed: ParsedManifest, size: int) -> ManifestRecord:
    """The index row of a parsed manifest."""
    return ManifestRecord(
        digest=str(digest),
        media_type=parsed.media_type,
        size=size,
        artifact_type=parsed.artifact_type,
        subject=str(parsed.subject.digest) if parsed.subject else None,
        annotations=parsed.annotations or None,
        blobs=[str(b.digest) for b in parsed.blobs],
        children=[str(m.digest) for m in parsed.manifests],
    )


async def add(
    store: Store,
    db: AsyncIndex,
    repo: RepoName,
    digest: Digest,
    body: bytes,
    parsed: ParsedManifest,
    *,
    tag: str | None,
    pinned: bool,
    checked: float | None,
    verify_refs: bool,
) -> ManifestAdded:
    """Place the manifest's file, then write its row (and move ``tag``), its references
    checked again in the row's transaction when ``verify_refs``: a blob evicted (or gc'd)
    since the ``PUT`` checked them refuses it (``MANIFEST_BLOB_UNKNOWN``), never a manifest
    whose blob is gone. A refusal or a failed write drops the file this call placed."""
    placed = False
    try:
        placed = await asyncio.get_running_loop().run_in_executor(None, place, store, digest, body)
        await db.write(Index.ensure_repo, repo.canonical, repo.host, repo.path)
        added = await db.write(
            Index.add_manifest,
            repo.canonical,
            record(digest, parsed, len(body)),
            tag=tag,
            pinned=pinned,
            checked=checked,
            verify_refs=verify_refs,
        )
    except Exception as exc:  # its index write ended, failed: no row names the file
        if placed:
            await drop_refused(store, db, digest, repo.canonical, exc)
        raise
    if added.missing:
        if placed:
            why = f"blob {added.missing[0]} gone"
            await drop_refused(store, db, digest, repo.canonical, why)
        raise ManifestBlobUnknown(added.missing[0])
    return added


def place(store: Store, digest: Digest, body: bytes) -> bool:
    """Write the manifest's file (blocking: on a thread); whether this call put it there."""
    there = store.stat(digest) == len(body)
    store.write_bytes(digest, body)
    return not there


async def drop_refused(
    store: Store, db: AsyncIndex, digest: Digest, repo: str, why: object
) -> None:
    """The file a refused ``PUT`` placed goes, unless a row stores its digest (asked after the
    file moved out: :mod:`regproxy.removal`; a writer of the same bytes in flight puts its own
    back). Call it only once the ``PUT``'s index write has ended (failed or refused): a write
    still running on its thread may yet add the row."""
    gone = await remove(store, [str(digest)], lambda ds: db.read(Index.stored_among, ds))
    if gone:
        log.info("manifest.refused_file_removed digest=%s repo=%s reason=%s", digest, repo, why)
