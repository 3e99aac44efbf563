"""When each (repository, digest) was last served, kept in memory and written to the index in
batches: a write per request would make every pull wait for the index's one writer.

The registry notes each access (:meth:`AccessTimes.note`); every few seconds, and before
eviction decides, :meth:`AccessTimes.flush` writes what was noted since the last flush,
:data:`TOUCH_BATCH` rows a transaction, so the writer (which every commit of a pull or a push
waits for) is held for milliseconds at a time, not for the whole flush (10,000 rows held it
~0.8 s at a million blobs). What a flush has not written yet is still seen as served: by the
web page's "last pulled" (:meth:`AccessTimes.unflushed`) and by eviction's "in use"
(:meth:`AccessTimes.pending`), until its last batch commits.
"""

from __future__ import annotations

import time
from collections import ChainMap
from collections.abc import Callable, Iterator, Mapping, Set
from types import MappingProxyType
from typing import Final

from regproxy.async_index import AsyncIndex
from regproxy.index import Index

#: access times written per index transaction
TOUCH_BATCH: Final = 500

Served = dict[tuple[str, str], float]


class AccessTimes:
    def __init__(self, db: AsyncIndex, clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._clock = clock
        self._noted: Served = {}
        self._noted_digests: set[str] = set()  # the digests of ``_noted``
        #: what flushes are writing (newest last), each until its last batch committed
        self._flushing: list[Served] = []
        self._flushing_digests: list[set[str]] = []

    def note(self, repo: str, digest: str) -> None:
        self._noted[(repo, digest)] = self._clock()
        self._noted_digests.add(digest)

    def pending(self) -> Set[str]:
        """Digests served since the last flush, with those a flush is still writing (between
        its batches eviction may run): a live view (see :class:`Pending`)."""
        return Pending(self)

    def _pending_has(self, digest: object) -> bool:
        return digest in self._noted_digests or any(
            digest in digests for digests in self._flushing_digests
        )

    def _pending_all(self) -> set[str]:
        return self._noted_digests.union(*self._flushing_digests)

    def unflushed(self) -> Mapping[tuple[str, str], float]:
        """(repository, digest) -> when it was last served, of what no flush has written yet
        (or not all of yet): a read-only view. Taken before a read of the index it holds every
        time the read may miss: a flush swaps in an empty map and keeps the one it writes."""
        if not self._flushing:
            return MappingProxyType(self._noted)
        return MappingProxyType(ChainMap(self._noted, *reversed(self._flushing)))

    async def flush(self) -> None:
        if not self._noted:
            return
        # each set is among the flushing before it leaves the noted: eviction's thread, asking
        # meanwhile, finds a digest in one place or the other (see :class:`Pending`)
        served, digests = self._noted, self._noted_digests
        self._flushing.append(served)
        self._flushing_digests.append(digests)
        self._noted, self._noted_digests = {}, set()
        try:
            items = [(r, d, t) for (r, d), t in served.items()]
            for i in range(0, len(items), TOUCH_BATCH):
                await self._db.write(Index.touch, items[i : i + TOUCH_BATCH])
        finally:
            self._flushing = [m for m in self._flushing if m is not served]
            self._flushing_digests = [s for s in self._flushing_digests if s is not digests]


class Pending(Set[str]):
    """The digests served and not written yet, as they are when asked, not when the view was
    made: eviction holds one through a whole batch on the index's thread, which asks it about
    each digest that would go (a lookup in a few sets; the event loop builds nothing per
    batch, where a copy of 10,000 served digests took it ~1.5 ms at each batch)."""

    def __init__(self, times: AccessTimes) -> None:
        self._times = times

    def __contains__(self, digest: object) -> bool:
        return self._times._pending_has(digest)

    def __iter__(self) -> Iterator[str]:
        return iter(self._times._pending_all())

    def __len__(self) -> int:
        return len(self._times._pending_all())
