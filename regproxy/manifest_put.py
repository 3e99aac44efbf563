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

import logging

from regproxy.async_index import AsyncIndex
from regproxy.index import Index, ManifestRecord
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
