"""A writer's last step, once its index row is written: its file made sure of.

A push, a pull-through fetch, an import and a manifest ``PUT`` write their row, then make sure
the file is still in place (:meth:`~regproxy.store.BlobWriter.settle`,
:meth:`~regproxy.store.Store.ensure_bytes`): a removal may have moved it out meanwhile
(:mod:`regproxy.removal`). When this host's disk keeps the file from going back (full, EIO), the
row this writer wrote goes again, so the index never names a file that is not there, and the
writer answers the disk's error (507 full, else 500), logged with the digest and repository.
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

log = logging.getLogger("regproxy.store")


async def settle_row(
    db: AsyncIndex,
    cache: LookupCache,
    repo: str,
    digest: Digest,
    settle: Callable[[Digest], object],
    *,
    manifest: bool = False,
) -> None:
    """Run ``settle(digest)`` (blocking, on the executor) after the row of ``digest`` in ``repo``;
    if it raises the store's error, that row (a manifest's with its tags in ``repo``) is
    removed and the error raised."""
    try:
        await asyncio.get_running_loop().run_in_executor(None, settle, digest)
    except (StorageFull, StoreFailed) as exc:
        log.error(
            "store.settle_failed digest=%s repo=%s kind=%s error=%s: the file could not be put "
            "back, its row is removed",
            digest,
            repo,
            "manifest" if manifest else "blob",
            exc.detail,
        )
        key = (repo, str(digest))
        if manifest:
            await db.write(Index.delete_manifest, repo, str(digest))
            cache.forget(manifests=[key], tags_of=[repo], bodies=[str(digest)])
        else:
            await db.write(Index.unlink_blob, repo, str(digest))
            cache.forget(links=[key])
        raise
