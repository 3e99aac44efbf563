"""Access times are written in batches: the index's writer, which every commit of a pull or a
push waits for, is held for one batch at a time, and what a flush has not written yet is still
seen as served (by the web page's "last pulled" and by eviction's "in use")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regproxy.access_times import TOUCH_BATCH, AccessTimes
from regproxy.async_index import AsyncIndex
from regproxy.index import Index, ManifestRecord

SERVED_AT = 12345.0


async def test_a_flush_lets_other_writes_in_between_its_batches(tmp_path: Path) -> None:
    db = AsyncIndex(tmp_path / "index.db")
    await db.open()
    try:
        n = 2 * TOUCH_BATCH + 200
        digests = [f"sha256:{i:064x}" for i in range(n)]

        def add(ix: Index) -> None:
            with ix.transaction():
                ix.ensure_repo("r", None, "r")
                for d in digests:
                    ix.add_blob("r", d, 1)

        def written(ix: Index) -> int:
            row = ix.db.execute(
                "SELECT COUNT(*) FROM blobs WHERE last_access = ?", (SERVED_AT,)
            ).fetchone()
            return int(row[0])

        await db.write(add)
        access = AccessTimes(db, clock=lambda: SERVED_AT)
        view = access.pending()  # live: eviction's batch asks it from the index's thread
        assert digests[0] not in view
        for d in digests:
            access.note("r", d)
        flush = asyncio.create_task(access.flush())
        await asyncio.sleep(0)  # its first batch is with the writer
        during = access.unflushed()
        assert len(during) == n and all(t == SERVED_AT for t in during.values())
        assert access.pending() == set(digests) and digests[0] in view
        between = await db.write(written)  # another write: it waits for one batch only
        assert 0 < between < n
        await flush
        assert await db.read(written) == n
        assert not access.unflushed() and not access.pending() and digests[0] not in view
        assert len(during) == n  # a view taken during the flush keeps what it saw
    finally:
        await db.close()


def test_touch_times_rows_their_units_blobs_and_repositories(tmp_path: Path) -> None:
    """Index.touch: a repository manifest's time, the
    index listing it and the subject it refers to (the later of theirs and its own), a blob
    that is no repository manifest, the repository; other repositories' rows stay."""
    ix = Index(tmp_path / "index.db")
    ix.open()
    d = [f"sha256:{i:064x}" for i in range(8)]
    child, index, subject, referrer, blob, elsewhere = d[:6]

    def rec(
        digest: str, *, children: tuple[str, ...] = (), subject: str | None = None
    ) -> ManifestRecord:
        return ManifestRecord(digest, "m", 1, None, subject, None, [blob], children)

    with ix.transaction():
        for repo in ("r", "s"):
            ix.ensure_repo(repo, None, repo)
            ix.add_blob(repo, blob, 1)
        ix.add_manifest("r", rec(child))
        ix.add_manifest("r", rec(index, children=(child,)), tag="i")
        ix.add_manifest("r", rec(subject), tag="s")
        ix.add_manifest("r", rec(referrer, subject=subject))
        ix.add_manifest("s", rec(index, children=(child,)), tag="i")  # another repository's row
        ix.add_manifest("s", rec(elsewhere), tag="e")
    with ix.transaction() as db:
        db.execute("UPDATE repo_manifests SET last_access = 50")
    # the same key twice: the last time counts; the index's own time is older than its child's
    ix.touch([("r", child, 90.0), ("r", index, 60.0), ("r", referrer, 80.0), ("r", child, 100.0)])
    ix.touch([("s", blob, 75.0), ("r", blob, 110.0)])

    def row(repo: str, digest: str) -> float:
        q = "SELECT last_access FROM repo_manifests WHERE repo=? AND digest=?"
        return float(ix.db.execute(q, (repo, digest)).fetchone()[0])

    assert row("r", child) == 100.0
    assert row("r", index) == 100.0  # its own 60, then its child's 100
    assert row("r", referrer) == 80.0 and row("r", subject) == 80.0
    assert row("s", index) == 50.0 and row("s", elsewhere) == 50.0
    blob_time = ix.db.execute("SELECT last_access FROM blobs WHERE digest=?", (blob,)).fetchone()
    assert blob_time[0] == 110.0
    repos = dict(ix.db.execute("SELECT name, last_access FROM repos").fetchall())
    assert repos == {"r": 110.0, "s": 75.0}
    ix.close()
