"""Whether another process changed the index: what keeps the cached tags believed.

:class:`IndexWatch` reads SQLite's ``data_version`` of the writer's connection, which moves when
another connection (``regproxy import``, ``pin``, ``gc``, ``fsck --repair``) committed. While it
has not moved, the tags looked up since the confirmations started stay believed for
:data:`~regproxy.lookups.TAG_CACHE_SECONDS` more (:meth:`LookupCache.confirm_tags`); when it has,
every cached lookup is dropped (content another process removed is not served on from memory)
and the confirmations start over.

The version is read on the writer's connection, so a check waits for the writer's work queued
before it: an eviction batch, which on a busy host may take seconds. While the writer is in a
transaction begun at the version last seen, no other process can have changed the index (the
transaction holds the write lock): the tags are confirmed then and there, without waiting, and
again every :data:`~regproxy.lookups.TAG_CONFIRM_SECONDS` while a check waits, so a long write
does not make every cached tag go stale at once.
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

    def _unchanged_now(self) -> bool:
        return self.version is not None and self.db.writing_unchanged(self.version)

    async def check(self) -> None:
        """One confirmation (the first check only starts them)."""
        since = time.monotonic()
        if self._unchanged_now():
            self.cache.confirm_tags(since)
            return
        asked = asyncio.ensure_future(self.db.write(Index.data_version))
        try:
            while not (await asyncio.wait({asked}, timeout=TAG_CONFIRM_SECONDS))[0]:
                peek = time.monotonic()
                if self._unchanged_now():
                    self.cache.confirm_tags(peek)
        finally:
            asked.cancel()  # a no-op once it is done (what it asked of the writer runs anyway)
        version = asked.result()
        if version == self.version:
            self.cache.confirm_tags(since)
            return
        if self.version is not None:
            # another process changed the index (import, pin, gc, fsck --repair): whatever is
            # cached may be gone or moved, not only tags
            self.cache.forget(everything=True)
        self.version = version
        self.cache.restart_tags(time.monotonic())
