"""A store and its index opened for a command beside the daemon: to change them, or only to
read them (``fsck`` without ``--repair``, ``gc --dry-run``): then nothing is created, swept or
upgraded (:meth:`~regproxy.async_index.AsyncIndex.open_readonly`, :meth:`Store.check`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from regproxy.async_index import AsyncIndex
from regproxy.store import Store


async def open_store(root: Path, *, readonly: bool) -> tuple[Store, AsyncIndex]:
    """The store at ``root`` and its index, open; the caller closes the index."""
    store, db = Store(root), AsyncIndex(root / "index.db")
    loop = asyncio.get_running_loop()
    if not readonly:
        await loop.run_in_executor(None, lambda: store.open(sweep=False))  # not ours to sweep
        await db.open()
        return store, db
    await loop.run_in_executor(None, store.check)  # another layout: refused before its index
    await db.open_readonly()
    return store, db
