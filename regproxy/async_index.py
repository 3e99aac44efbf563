"""The one async facade over the metadata index that every module of the daemon uses.

SQLite in WAL mode has one writer and any number of readers that never wait for it. So:

* :meth:`AsyncIndex.write` runs a function on the index's only writer thread, with the one
  read-write :class:`~regproxy.index.Index` (every change, and reads that must see a change in
  the same transaction);
* :meth:`AsyncIndex.read` runs it on one of a few reader threads, each with a read-only
  connection of its own: lookups, listings and the web page's queries go on while the writer
  is busy (an eviction batch, a burst of commits), and they see every committed change.

The function gets the thread's :class:`~regproxy.index.Index` as its first argument, so
``await db.read(Index.resolve_tag, repo, tag)`` and ``await db.read(regproxy.ui.queries.totals)`` are
typed calls. Nothing else in the daemon opens the index or owns a thread for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Concatenate, Final, ParamSpec, TypeVar

from regproxy.index import Index
from regproxy.index import call as index_call
from regproxy.thread_names import kernel_name

P = ParamSpec("P")
T = TypeVar("T")
#: reader threads (each holds one read-only connection and its page cache)
READERS: Final = 2
#: how much lower the CPU priority of :meth:`AsyncIndex.write_background` work is (``nice``)
BACKGROUND_NICE: Final = 10


class AsyncIndex:
    def __init__(self, path: Path, *, readers: int = READERS) -> None:
        self.path = path
        self._writer_index = Index(path)
        self._writer = ThreadPoolExecutor(
            1, thread_name_prefix="regproxy-index", initializer=kernel_name
        )
        self._readers = ThreadPoolExecutor(
            readers, thread_name_prefix="regproxy-index-read", initializer=kernel_name
        )
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix="regproxy-index-bg", initializer=_background_thread
        )
        self._local = threading.local()
        self._reader_indexes: list[Index] = []
        self._lock = threading.Lock()

    async def open(self) -> None:
        """Open (create or upgrade, see :mod:`regproxy.schema`) the index on the writer."""
        await self.write(Index.open)

    async def open_readonly(self) -> None:
        """For a command that only reads (plain ``fsck``, ``gc --dry-run``, ``pins``): check on
        a reader that the index is there with this release's schema, and open no writer, so
        nothing is created or upgraded (:func:`regproxy.schema.require_current`); then use
        :meth:`read` only. On a refusal the threads are ended here."""
        try:
            await self.read(Index.require_current)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await self.write(Index.close)
        await loop.run_in_executor(None, self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._background.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        with self._lock:
            for ix in self._reader_indexes:
                ix.close()
            self._reader_indexes.clear()

    async def write(
        self, fn: Callable[Concatenate[Index, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``fn(index, ...)`` on the writer thread (changes; reads inside a change); a full disk
        is :class:`~regproxy.errors.StorageFull` (see :func:`regproxy.index.call`)."""
        call = functools.partial(self._on_writer, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._writer, call)

    def _on_writer(
        self, fn: Callable[Concatenate[Index, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        with self._writer_index.busy:  # the connection is this call's (see :meth:`peek_version`)
            return index_call(fn, self._writer_index, *args, **kwargs)

    async def write_background(
        self, fn: Callable[Concatenate[Index, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """:meth:`write` for background work (an eviction batch): in the writer's turn and on
        its connection, but run by a thread at a lower CPU priority (:data:`BACKGROUND_NICE`)
        while the writer thread waits for it. On a busy host the CPU it needs (an eviction
        batch is mostly SQLite's own work, the GIL released) goes to the event loop first.
        ``fn`` uses the connection only inside one ``index.transaction()``: until it begins,
        :meth:`peek_version` may read on the connection (the thread may wait long for a CPU)."""
        # the connection is the call's only inside its ``index.transaction()``, where all its
        # work must be: a batch handed over but not run yet leaves it free to peek at
        call = functools.partial(index_call, fn, self._writer_index, *args, **kwargs)
        background = self._background

        def handed_over() -> T:
            return background.submit(call).result()

        return await asyncio.get_running_loop().run_in_executor(self._writer, handed_over)

    def writing_unchanged(self, version: int) -> bool:
        """Whether the writer's connection is in a write transaction begun at ``data_version``
        ``version`` (see :meth:`Index.writing_unchanged`): no hand-off, answered now, so a
        check need not wait behind a long write (an eviction batch) to know that no other
        process changed the index."""
        return self._writer_index.writing_unchanged(version)

    async def peek_version(self) -> int | None:
        """The writer connection's ``data_version`` now, read on the default executor if no
        call is running on that connection (one queued behind does not count: a batch handed
        to a background thread the kernel has not run yet); None if one is. For a check that
        need not wait in the writer's queue."""
        return await asyncio.get_running_loop().run_in_executor(None, self._peek)

    def _peek(self) -> int | None:
        ix = self._writer_index
        if not ix.busy.acquire(blocking=False):
            return None
        try:
            return ix.data_version()
        finally:
            ix.busy.release()

    async def read(
        self, fn: Callable[Concatenate[Index, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``fn(index, ...)`` on a reader thread with a read-only connection: never waits for
        the writer, and sees every change committed before it started."""
        call = functools.partial(self._on_reader, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._readers, call)

    def _on_reader(
        self, fn: Callable[Concatenate[Index, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        ix: Index | None = getattr(self._local, "index", None)
        if ix is None:
            ix = Index(self.path, readonly=True)
            self._local.index = ix
            with self._lock:
                self._reader_indexes.append(ix)
        return fn(ix, *args, **kwargs)


def _background_thread() -> None:
    kernel_name()
    _lower_priority()


def _lower_priority() -> None:
    """Lower this thread's CPU priority (raising a nice value needs no privilege); where the
    call is missing or refused, the thread runs as it is."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)
        )
