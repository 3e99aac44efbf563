"""Whether another process changed the index: what keeps the cached tags believed.

:class:`IndexWatch` reads SQLite's ``data_version`` of the writer's connection, which moves when
another connection (``regproxy import``, ``pin``, ``gc``, ``fsck --repair``) committed. While it
has not moved, the tags looked up since the confirmations started stay believed for
:data:`~regproxy.lookups.TAG_CACHE_SECONDS` more (:meth:`LookupCache.confirm_tags`); when it has,
every cached lookup is dropped (content another process removed is not served on from memory)
and the confirmations start over.

The version is that of the writer's connection; a check through the writer's queue would wait
for the work queued before it: an eviction batch, which on a busy host may wait seconds for a CPU
(it runs at a lower priority) and then hold the connection. So a check asks without queueing
first, and again every :data:`~regproxy.lookups.TAG_CONFIRM_SECONDS` while its queued read
waits: when no call runs on the connection, its version is read right away
(:meth:`AsyncIndex.peek_version`); when one is in a transaction begun at the version last seen,
no other process can have changed the index (the transaction holds the write lock), so nothing
needs reading. A long write thus does not make every cached tag go stale at once.
"""

from __future__ import annotations

import asyncio
import time

from regproxy.async_index import AsyncIndex
from regproxy.index import Index
from regproxy.lookups import TAG_CONFIRM_SECONDS, LookupCache


class IndexWatch:
    """The index's ``data_version`` as last seen, and the checks that confirm the tags."""

    def __init__(self, db: AsyncIndex, cache: LookupCache) -> None:
        self.db = db
        self.cache = cache
        #: the writer connection's ``data_version`` at the last check (None: none yet)
        self.version: int | None = None

    async def _peek(self) -> int | None:
        """The version now, if it can be had without waiting in the writer's queue."""
        if self.version is not None and self.db.writing_unchanged(self.version):
            return self.version
        return await self.db.peek_version()

    async def check(self) -> None:
        """One confirmation (the first check only starts them)."""
        since = time.monotonic()
        version = await self._peek()
        if version is None:
            queued = since  # the queued read is current as of then
            asked = asyncio.ensure_future(self.db.write(Index.data_version))
            try:
                while version is None:
                    if (await asyncio.wait({asked}, timeout=TAG_CONFIRM_SECONDS))[0]:
                        version, since = asked.result(), queued
                        break
                    since = time.monotonic()
                    version = await self._peek()
            finally:
                asked.cancel()  # not read if still queued; a no-op once done
        if version == self.version:
            self.cache.confirm_tags(since)
            return
        if self.version is not None:
            # another process changed the index (import, pin, gc, fsck --repair): whatever is
            # cached may be gone or moved, not only tags
            self.cache.forget(everything=True)
        self.version = version
        self.cache.restart_tags(time.monotonic())
