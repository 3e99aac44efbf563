"""Access times are written in batches: the index's writer, which every commit of a pull or a
push waits for, is held for one batch at a time, and what a flush has not written yet is still
seen as served (by the web page's "last pulled" and by eviction's "in use")."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regproxy.async_index import AsyncIndex
from regproxy.index import Index
from regproxy.registry import TOUCH_BATCH, LocalRegistry
from regproxy.store import Store

SERVED_AT = 12345.0


async def test_a_flush_lets_other_writes_in_between_its_batches(tmp_path: Path) -> None:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
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

        await reg.db.write(add)
        for d in digests:  # served, as the blob handlers note it
            reg._access[("r", d)] = SERVED_AT
        flush = asyncio.create_task(reg.flush_access())
        await asyncio.sleep(0)  # its first batch is with the writer
        during = reg.unflushed_access()
        assert len(during) == n and all(t == SERVED_AT for t in during.values())
        assert reg.pending_access() == set(digests)
        between = await reg.db.write(written)  # another write: it waits for one batch only
        assert 0 < between < n
        await flush
        assert await reg.db.read(written) == n
        assert not reg.unflushed_access() and not reg.pending_access()
        assert len(during) == n  # a view taken during the flush keeps what it saw
    finally:
        await reg.close()
