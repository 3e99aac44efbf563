"""A blob on its way into the store, as its readers see it (regproxy.fetch fills it).

Every request for the digest reads the growing temp file as bytes land (zot's
InFlightBlobCopier), Range included; the final byte of any response is held back until the
digest has been verified, so a client never receives a complete response with wrong bytes: on a
mismatch or a failure every open response is cut instead, and so is one that already sent bytes
of a source the transfer abandoned for a fresh file (a new *generation*).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from regproxy.errors import OCIError
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.store import BlobWriter, Store
from regproxy.units import BLOB_CHUNK


class TransferFailed(OCIError):
    code, http_status, message = "UNKNOWN", 502, "the blob transfer failed"


class Transfer:
    """One blob on its way from a source into the store."""

    def __init__(self, digest: Digest, store: Store, metrics: Metrics | None = None) -> None:
        self.digest = digest
        self.store = store
        self.metrics = metrics
        self.size: int | None = None
        self.written = 0
        self.committed = False
        self.error: OCIError | None = None
        self.source = ""
        self.repo = ""
        self.kind = "upstream"
        #: how the last body was copied: "thread" (regproxy.pump) or "loop"
        self.copy = ""
        self.writer: BlobWriter | None = None
        self.started = time.monotonic()
        self.waiters = 0
        #: the kinds of its current and remaining sources: a transfer that is or may be fed
        #: by another host's transfer ("home") is never joined by a peer's fetch request, so
        #: no two hosts ever tail each other
        self.kinds: frozenset[str] = frozenset()
        #: bumped when the file starts over (for the next source, or the same one from 0)
        self.generation = 0
        #: the file may hold bytes of more than one source (the next one went on where the
        #: last one stopped): a digest mismatch then blames none of them
        self.mixed = False
        #: set (and replaced) on every change: what waiters wake up on
        self._changed = asyncio.Event()
        #: each open response's next offset (see :meth:`read_floor`)
        self._reading: dict[object, int] = {}

    def read_floor(self) -> int:
        """The lowest offset an open response still needs (what it has not sent yet), or the
        bytes written when none is open: the writer drops pages below it (any thread)."""
        return min(tuple(self._reading.values()), default=self.written)

    async def drop_committed(self) -> None:
        """Once committed and no response reads it as it lands: a writer that dropped behind
        drops the rest (what the last :data:`~regproxy.page_cache.DROP_LAG` and slow readers kept;
        a reader slower than the source held every page, and the writes ended before it
        moved on)."""
        writer = self.writer
        if self.committed and not self._reading and writer is not None and writer.drops_behind:
            await asyncio.get_running_loop().run_in_executor(None, writer.drop_committed)

    @property
    def done(self) -> bool:
        return self.committed or self.error is not None

    def notify(self) -> None:
        """Something changed (bytes landed, a size, the end, a new generation): wake waiters."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait_change(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def wait_size(self) -> int:
        """Until the source answered with a size (or the transfer failed)."""
        await self._wait_change(lambda: self.size is not None or self.error is not None)
        if self.size is None:
            assert self.error is not None
            raise self.error
        return self.size

    async def wait_begun(self) -> None:
        """Until a first byte is in the file, or the transfer ended: a response waits for this
        before its headers, so a transfer that fails at once (a full disk: 507; a source that
        fails before sending anything) is answered with its error, not a 200 cut at 0 bytes."""
        await self._wait_change(lambda: self.written > 0 or self.done)
        if self.error is not None:
            raise self.error

    async def wait_done(self) -> None:
        await self._wait_change(lambda: self.done)
        if self.error is not None:
            raise self.error

    def _open_for_read(self) -> Any:
        """The file open for reading, or None: neither the temp file nor the blob is there."""
        # The temp file is renamed into blobs/ on commit; an fd opened before stays valid.
        assert self.writer is not None
        try:
            return open(self.writer.path, "rb")
        except FileNotFoundError:
            pass
        try:
            return open(self.store.blob_path(self.digest), "rb")
        except FileNotFoundError:
            return None

    async def _open(self) -> tuple[Any, int]:
        """The file open for reading, and the generation it is of. Gone: the transfer failed
        (or moved on to another source) and removed its file; it removes the file before it
        publishes the failure, so until it does this waits, then raises that failure (a full
        disk is 507, not this response's own 502), or opens the file it moved on to."""
        loop = asyncio.get_running_loop()
        while True:
            generation = self.generation
            f = await loop.run_in_executor(None, self._open_for_read)
            if f is not None:
                return f, generation
            if self.error is not None:
                raise self.error
            if self.committed:  # committed, then removed (evicted) before this read
                raise TransferFailed(f"{self.digest}: its file is gone")
            await self._wait_change(functools.partial(self._said, generation))

    def _said(self, generation: int) -> bool:
        """Whether the transfer ended, or moved on from ``generation`` to a fresh file."""
        return self.done or self.generation != generation

    def _progress_past(self, pos: int, end: int, generation: int) -> Callable[[], bool]:
        def ready() -> bool:
            return (
                self.error is not None
                or self.committed
                or self.generation != generation
                or min(self.written, end) > pos
            )

        return ready

    async def spans(
        self, start: int, end: int, size: int | None = None
    ) -> AsyncIterator[tuple[int, int, int]]:
        """Bytes start..end (inclusive) as they land, as ``(fd, pos, stop)``: the bytes
        ``pos..stop-1`` of the file open on ``fd`` may be sent now (``sendfile``), and are sent
        before the next span is asked for. The last byte comes only once verified.

        ``size`` is the blob size the response announced: it is cut if the transfer's changes.
        """
        loop = asyncio.get_running_loop()
        current = await self.wait_size()
        size = current if size is None else size
        f, generation = await self._open()
        self.waiters += 1
        if self.metrics is not None:
            self.metrics.inflight_waiters.inc()
        me = object()
        try:
            pos = start
            while pos <= end:
                self._reading[me] = pos
                if self.error is not None:
                    raise self.error
                if self.size != size:  # sized by a source that was abandoned: cut
                    raise TransferFailed(f"{self.digest}: size {self.size}, answered {size}")
                if self.generation != generation:
                    if pos > start:  # bytes of an abandoned source went out: cut this response
                        raise TransferFailed(f"{self.digest}: source changed mid-response")
                    await loop.run_in_executor(None, f.close)  # closed again at the end: no-op
                    f, generation = await self._open()
                # readable now: what is written, but never the response's last byte
                # before the digest is verified
                limit = end + 1 if self.committed else min(self.written, end)
                if limit > pos:
                    yield f.fileno(), pos, limit
                    pos = limit
                    continue
                await self._wait_change(self._progress_past(pos, end, generation))
        finally:
            self._reading.pop(me, None)
            self.waiters -= 1
            if self.metrics is not None:
                self.metrics.inflight_waiters.dec()
            await loop.run_in_executor(None, f.close)
            await self.drop_committed()

    async def read_range(
        self, start: int, end: int, size: int | None = None
    ) -> AsyncIterator[bytes]:
        """The bytes of :meth:`spans`, read from the file (for clients without sendfile)."""
        loop = asyncio.get_running_loop()
        async for fd, pos, stop in self.spans(start, end, size):
            while pos < stop:
                data = await loop.run_in_executor(
                    None, os.pread, fd, min(stop - pos, BLOB_CHUNK), pos
                )
                if not data:
                    raise TransferFailed(f"{self.digest}: short read at {pos} of {size}")
                pos += len(data)
                yield data
