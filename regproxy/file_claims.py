"""Who may put a blob's file in place, and who may remove it, right now.

Eviction decides in the index that a digest may go and unlinks its file afterwards, on threads.
A writer (a push, a pull-through fetch, an import, a manifest ``PUT``) renames its verified file
into the same path and then adds the index row. Without a claim, the two interleave badly:
eviction finds the digest unindexed, the writer renames its file and indexes it, eviction
unlinks the file: a row without its bytes.

So both sides take a claim, on the event loop's thread (a dict lookup; no lock):

* a writer holds the digest from before its file is renamed (or found already in place) until
  its index row is written (:meth:`FileClaims.writing`); it waits first while a removal of the
  digest is under way;
* a removal (:meth:`FileClaims.removing`) takes only the digests no writer holds, then looks in
  the index again and unlinks what is still unindexed; writers of those digests wait for it.

Either the removal checks the index after the writer's row is in (and keeps the file), or the
writer places its file after the unlink (a new file), or the removal skips the digest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager

log = logging.getLogger(__name__)


class FileClaims:
    """Claims on blob files by digest (a string), for one process's writers and evictor."""

    def __init__(self) -> None:
        self._writers: dict[str, int] = {}
        self._removing: dict[str, asyncio.Event] = {}
        #: how many times a writer waited for a removal (tests and debugging)
        self.waits = 0

    async def hold(self, digest: str) -> None:
        """Claim ``digest`` for a writer, once no removal of it is under way."""
        while (removal := self._removing.get(digest)) is not None:
            self.waits += 1
            log.debug("store.claim_wait digest=%s", digest)
            await removal.wait()
        self._writers[digest] = self._writers.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        n = self._writers.pop(digest, 0) - 1
        if n > 0:
            self._writers[digest] = n

    @asynccontextmanager
    async def writing(self, digest: str) -> AsyncIterator[None]:
        await self.hold(digest)
        try:
            yield
        finally:
            self.release(digest)

    def held(self, digest: str) -> bool:
        return digest in self._writers

    @contextmanager
    def removing(self, digests: Iterable[str]) -> Iterator[list[str]]:
        """The digests of ``digests`` nobody writes or removes now, claimed for removal until
        the block ends (writers of them wait)."""
        done = asyncio.Event()
        taken = [
            d for d in dict.fromkeys(digests) if d not in self._writers and d not in self._removing
        ]
        for d in taken:
            self._removing[d] = done
        try:
            yield taken
        finally:
            for d in taken:
                del self._removing[d]
            done.set()
