"""Access times are written in batches: the index's writer, which every commit of a pull or a
push waits for, is held for one batch at a time, and what a flush has not written yet is still
seen as served (by the web page's "last pulled" and by eviction's "in use")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regproxy.access_times import TOUCH_BATCH, AccessTimes
from regproxy.async_index import AsyncIndex
from regproxy.index import Index

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
