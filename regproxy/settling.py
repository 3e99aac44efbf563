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

A manifest ``PUT`` that fails so leaves its repository as it was (:func:`take_back`): the tag
it moved points where it did before (if that manifest is still in the repository; else it
goes), and the row goes only if this ``PUT`` added it, with the tags naming it since; a row
the repository held before is not the ``PUT``'s to remove, nor are the tags naming it, and a
pin the ``PUT`` gave it goes again (it was held unpinned: pulled through, say).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from regproxy.async_index import AsyncIndex
from regproxy.errors import StorageFull, StoreFailed
from regproxy.index import Index, ManifestAdded
from regproxy.lookups import LookupCache
from regproxy.oci import Digest
from regproxy.store import Store

log = logging.getLogger("regproxy.store")


class PutBackFull(StorageFull):
    """A writer's file the full disk kept from going back once its row was written (507)."""


class PutBackFailed(StoreFailed):
    """A writer's file the disk failed otherwise (EIO, ...) to put back after its row (500)."""


async def settle_row(
    db: AsyncIndex,
    cache: LookupCache,
    store: Store,
    repo: str,
    digest: Digest,
    settle: Callable[[Digest], object],
    *,
    manifest: ManifestAdded | None = None,
) -> None:
    """Run ``settle(digest)`` (blocking, on the executor) after the row of ``digest`` in ``repo``;
    if it raises the store's error, :class:`PutBackFull` or :class:`PutBackFailed` (naming the
    digest) is raised, and that row removed first if the store has no file of the digest left
    (a manifest's, what ``manifest`` added: :func:`take_back`)."""
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
            "blob" if manifest is None else "manifest",
            exc.detail,
            "its row is removed" if gone else "a removal holds it and puts it back: row kept",
        )
        failed = PutBackFull if isinstance(exc, StorageFull) else PutBackFailed
        error = failed(f"the disk refused putting {digest} back into the store ({exc.detail})")
        if not gone:
            raise error from exc
        key = (repo, str(digest))
        if manifest is not None:
            await db.write(take_back, repo, str(digest), manifest)
            cache.forget(manifests=[key], tags_of=[repo], bodies=[str(digest)])
        else:
            await db.write(Index.unlink_blob, repo, str(digest))
            cache.forget(links=[key])
        raise error from exc


def take_back(ix: Index, repo: str, digest: str, added: ManifestAdded) -> None:
    """Undo what :meth:`Index.add_manifest` did (``added``) for a manifest whose file is gone:
    the tag it moved, if it still names the manifest, goes back to its row before
    (``tag_was``) if that manifest is still in the repository, else goes; the manifest's row
    goes if the repository did not hold it before, with every tag naming it (none did before:
    a tag never names a manifest its repository does not hold); if it did, the pin this add
    gave it (``added.pinned``) goes."""
    with ix.transaction() as db:
        tag, was = added.tag, added.tag_was
        now = (
            None
            if tag is None
            else db.execute(
                "SELECT digest FROM tags WHERE repo=? AND tag=?", (repo, tag)
            ).fetchone()
        )
        if now is not None and now[0] == digest:  # else moved on since
            if was is not None and ix.manifest_in_repo(repo, was[0]) is not None:
                db.execute(
                    "UPDATE tags SET digest=?, updated=?, checked=? WHERE repo=? AND tag=?",
                    (*was, repo, tag),
                )
            else:
                db.execute("DELETE FROM tags WHERE repo=? AND tag=?", (repo, tag))
        if not added.held:
            db.execute("DELETE FROM repo_manifests WHERE repo=? AND digest=?", (repo, digest))
            db.execute("DELETE FROM tags WHERE repo=? AND digest=?", (repo, digest))
        elif added.pinned:  # held unpinned before: the pin was this PUT's
            ix.pin_manifests(repo, [digest], False)
