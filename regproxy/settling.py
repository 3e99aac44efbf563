"""A writer's last step, once its index row is written: its file made sure of.

A push, a pull-through fetch, an import and a manifest ``PUT`` write their row, then make sure
the file is still in place (:meth:`~regproxy.store.BlobWriter.settle`,
:meth:`~regproxy.store.Store.ensure_bytes`): a removal may have moved it out meanwhile
(:mod:`regproxy.removal`). When this host's disk keeps the file from going back (full, EIO), the
writer answers the disk's error (507 full, else 500), logged with the digest and repository,
and the row goes again only if no file of the digest is left anywhere (``Store.missing``), so
the index does not name a file that is not there. The row is keyed by repository and digest and
may be another writer's too (two pushes of one tag's manifest, or of one layer, at once): while
a removal still holds the file moved out, it is kept, and that removal, asking the index, puts
the file back for them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from regproxy.async_index import AsyncIndex
from regproxy.errors import StorageFull, StoreFailed
from regproxy.index import Index
from regproxy.lookups import LookupCache
from regproxy.oci import Digest
from regproxy.store import Store

log = logging.getLogger("regproxy.store")


async def settle_row(
    db: AsyncIndex,
    cache: LookupCache,
    store: Store,
    repo: str,
    digest: Digest,
    settle: Callable[[Digest], object],
    *,
    manifest: bool = False,
) -> None:
    """Run ``settle(digest)`` (blocking, on the executor) after the row of ``digest`` in ``repo``;
    if it raises the store's error, the error is raised, and that row (a manifest's with its tags
    in ``repo``) removed first if the store has no file of the digest left."""
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, settle, digest)
    except (StorageFull, StoreFailed) as exc:
        gone = await loop.run_in_executor(None, store.missing, digest)
        log.error(
            "store.settle_failed digest=%s repo=%s kind=%s error=%s: the file could not be put "
            "back; %s",
            digest,
            repo,
            "manifest" if manifest else "blob",
            exc.detail,
            "its row is removed" if gone else "a removal holds it and puts it back: row kept",
        )
        if not gone:
            raise
        key = (repo, str(digest))
        if manifest:
            await db.write(Index.delete_manifest, repo, str(digest))
            cache.forget(manifests=[key], tags_of=[repo], bodies=[str(digest)])
        else:
            await db.write(Index.unlink_blob, repo, str(digest))
            cache.forget(links=[key])
        raise
