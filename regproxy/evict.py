"""Eviction: keep the store between its watermarks, and the filesystem above ``min_free``.

When it runs: every ``storage.evict_interval``, and soon after new content is stored (the
registry tells its subscribers). A check reads the index's running totals (one row) and
``statvfs``: nothing is summed or scanned.

The watermarks: above ``storage.max_size`` (the high one) eviction frees until the store is at
``storage.evict_to`` (the low one: bytes, or a percentage of ``max_size``; 90% by default), so
a full cache is not re-planned at every commit. Under ``min_free`` it frees until the free space
is ``min_free`` plus the same proportion (``min_free / 0.9`` by default).

What goes, and in which order, is :mod:`regproxy.evict_batch`: loose content first (stored, not
referenced, not accessed for ``storage.upload_ttl``), then units of repository manifests, least
recently used first. Never evicted: pinned content and all it reaches (pushed, imported,
prefetched or ``regproxy pin``), a blob a kept manifest references, anything accessed in the
last :data:`IN_USE_SECONDS` (access times are flushed to the index when a run starts; what is
served during it is kept as in use) or being fetched.

How: one batch at a time on the index's writer, each a transaction of at most ~20 ms (lookups
run on the index's readers meanwhile); after each batch the registry forgets its cached lookups
of what went and the files are deleted (index rows first: nothing points to a missing file). A
request that looked something up just before it went finds the file gone and answers as if it
had never been here: a pull-through fetches it again (see ``LocalRegistry.manifest_body``). One log
line per evicted manifest (``evict.manifest``), one per round (``evict.done``).

The same loop notices when another process (``regproxy gc``, ``fsck --repair``, ``import``)
changed the index (SQLite's ``data_version``) and drops the registry's cached lookups, so content
those tools removed is fetched again rather than looked for on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from regproxy.config import Config, StorageConfig
from regproxy.evict_batch import Batch, evict_loose, evict_lru
from regproxy.evict_pace import Pace
from regproxy.fetch import Fetcher
from regproxy.index import Index
from regproxy.registry import Registry
from regproxy.removal import remove
from regproxy.thread_names import kernel_name

log = logging.getLogger("regproxy.evict")
#: a manifest or blob accessed this recently counts as being served: never evicted
IN_USE_SECONDS: Final = 5.0
STUCK_LOG_SECONDS: Final = 60.0
#: threads that delete evicted files at once (each mostly waits for the disk, see _Unlinker)
UNLINK_THREADS: Final = 4
#: ``evict.manifest`` lines logged in one go on the event loop
LOG_SLICE: Final = 8
_TASKS: set[asyncio.Task[Any]] = set()


@dataclass(frozen=True, slots=True)
class Watermarks:
    """Where eviction starts and where it stops, in bytes, for one filesystem size."""

    limit: int | None  # store bytes above which eviction starts (max_size)
    low: int | None  # store bytes it evicts down to (evict_to)
    floor: int  # free bytes below which eviction starts (min_free)
    floor_target: int  # free bytes it evicts up to

    @classmethod
    def of(cls, storage: StorageConfig, filesystem: int) -> Watermarks:
        limit = storage.max_size.resolve(filesystem) if storage.max_size else None
        ratio = storage.evict_to.fraction or 0.9
        low = None
        if limit is not None:
            low = min(limit, storage.evict_to.bytes or int(ratio * limit))
            ratio = low / limit if limit else ratio
        floor = storage.min_free.resolve(filesystem) if storage.min_free else 0
        target = int(floor / ratio) if floor and ratio > 0 else floor
        return cls(limit, low, floor, target)

    def short_of_disk(self, free: int) -> bool:
        """Whether the filesystem is under ``min_free``."""
        return bool(self.floor) and free < self.floor

    def need(self, stored: int, free: int) -> int:
        """Bytes to free now: 0 unless a high watermark is crossed."""
        over = stored - self.low if self.limit is not None and self.low is not None else 0
        if self.limit is None or stored <= self.limit:
            over = 0
        under = self.floor_target - free if self.short_of_disk(free) else 0
        return max(0, over, under)


@dataclass
class Round:
    """What one eviction run did."""

    need: int
    freed: int = 0
    manifests: int = 0  # units of repository manifests evicted
    loose: int = 0  # loose blobs and manifests evicted
    batches: int = 0
    seconds: float = 0.0

    @property
    def short(self) -> int:
        """Bytes still to free when nothing more may go (pinned, in use, recent)."""
        return max(0, self.need - self.freed)


class Evictor:
    """The daemon's eviction loop (started and stopped by app.py's cleanup_ctx)."""

    def __init__(
        self,
        registry: Registry,
        config: Config,
        *,
        in_use: float = IN_USE_SECONDS,
        clock: Callable[[], float] = time.time,
        pace: Callable[[], Pace] = Pace,
    ) -> None:
        self.registry = registry
        self.config = config
        self.in_use = in_use
        self.clock = clock
        self.pace = pace
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._data_version: int | None = None
        self._stuck_logged = -STUCK_LOG_SECONDS
        #: one round at a time: the loop's, or one a transfer asked for (make_room)
        self._lock = asyncio.Lock()
        #: transfers waiting for room: a paced round stops resting for them
        self._wanted = 0
        fetcher = getattr(registry, "fetcher", None)
        self.fetcher = fetcher if isinstance(fetcher, Fetcher) else None

    def start(self) -> None:
        self.registry.subscribe_stored(self.poke)
        if self.fetcher is not None and self.fetcher.space is not None:
            self.fetcher.space.room_from(self.make_room)
        self._task = asyncio.create_task(self._run(), name="evict")
        _TASKS.add(self._task)
        self._task.add_done_callback(_TASKS.discard)

    async def stop(self) -> None:
        if self.fetcher is not None and self.fetcher.space is not None:
            await self.fetcher.space.stop()  # and the rounds transfers started
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Ask for a check soon (new content was stored)."""
        self._wake.set()

    async def _run(self) -> None:
        interval = max(self.config.storage.evict_interval, 0.1)
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("evict.failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            self._wake.clear()

    def _inflight(self) -> set[str]:
        return {str(d) for d in self.fetcher.inflight} if self.fetcher is not None else set()

    def _busy(self) -> Container[str]:
        """Digests being fetched, or served since access times were last written: kept."""
        return _Busy(self.registry.pending_access(), self._inflight())

    async def make_room(self, need: int) -> int:
        """Free ``need`` bytes now for a transfer that does not fit (regproxy.space), plus the
        watermarks' margin (``max_size - evict_to``, or ``min_free``'s proportion), so a full
        cache is not re-planned at every miss: a round like the loop's, by the same rules
        (nothing pinned, in use or being fetched goes). Returns the bytes freed."""
        reg = self.registry
        self._wanted += 1
        try:
            await self._lock.acquire()
        finally:
            self._wanted -= 1
        try:
            total, _ = await asyncio.get_running_loop().run_in_executor(None, reg.store.disk_usage)
            marks = Watermarks.of(self.config.storage, total)
            margin = max((marks.limit or 0) - (marks.low or 0), marks.floor_target - marks.floor)
            r = await self.evict(need + margin)
        finally:
            self._lock.release()
        reg.metrics.store_bytes.set(await reg.db.read(Index.store_bytes))
        short = max(0, need - r.freed)
        (log.warning if short else log.info)(
            "evict.for_fetch need=%d margin=%d freed=%d manifests=%d loose=%d seconds=%.2f "
            "short=%d",
            need,
            margin,
            r.freed,
            r.manifests,
            r.loose,
            r.seconds,
            short,
        )
        return r.freed

    async def check(self) -> Round | None:
        """One round: measure, and evict when a high watermark is crossed."""
        async with self._lock:
            return await self._check()

    async def _check(self) -> Round | None:
        reg = self.registry
        version = await reg.db.write(Index.data_version)
        if self._data_version is not None and version != self._data_version:
            log.info("index.changed_elsewhere dropping cached lookups")
            reg.cache.forget(everything=True)
        self._data_version = version
        totals = await reg.db.read(Index.totals)
        self.registry.metrics.store_bytes.set(totals.stored_bytes)
        self.registry.metrics.pinned_bytes.set(totals.pinned_bytes)
        total, free = await asyncio.get_running_loop().run_in_executor(None, reg.store.disk_usage)
        marks = Watermarks.of(self.config.storage, total)
        self.registry.metrics.store_limit_bytes.set(marks.limit or 0)
        self.registry.metrics.store_fs_free_bytes.set(free)
        need = marks.need(totals.stored_bytes, free)
        if need <= 0:
            self.registry.metrics.short(0)
            return None
        # above max_size only (not short of disk): the batches rest while requests keep the
        # event loop busy (regproxy.evict_pace)
        r = await self.evict(need, paced=not marks.short_of_disk(free))
        after = await reg.db.read(Index.totals)
        self.registry.metrics.store_bytes.set(after.stored_bytes)
        self.registry.metrics.pinned_bytes.set(after.pinned_bytes)
        self.registry.metrics.short(r.short)
        now = time.monotonic()
        if r.freed == 0 and now - self._stuck_logged < STUCK_LOG_SECONDS:
            return r  # nothing may go yet (pinned, in use, recent): say so once a minute
        self._stuck_logged = now if r.freed == 0 else 0.0
        (log.warning if r.short else log.info)(
            "evict.done freed=%d manifests=%d loose=%d batches=%d seconds=%.2f store=%d "
            "limit=%s low=%s free=%d floor=%d short=%d",
            r.freed,
            r.manifests,
            r.loose,
            r.batches,
            r.seconds,
            after.stored_bytes,
            marks.limit if marks.limit is not None else "-",
            marks.low if marks.low is not None else "-",
            free,
            marks.floor,
            r.short,
        )
        return r

    async def evict(self, need: int, *, paced: bool = False) -> Round:
        """Evict in batches until ``need`` bytes are freed or nothing more may go.

        The files of one batch are deleted while the next batch is planned (see
        :class:`_Unlinker`); the round ends when the last of them is gone. ``paced``: rest
        between batches while the event loop is busy (:mod:`regproxy.evict_pace`)."""
        reg = self.registry
        r = Round(need)
        started = time.monotonic()
        pace = self.pace()
        loose = Batch()  # the last batch of each kind: where the next one goes on
        lru = Batch()
        unlinker = _Unlinker(reg)
        deleting: asyncio.Task[None] | None = None  # the files of the batch before
        await reg.flush_access()  # the order is decided on fresh access times
        try:
            while r.freed < need:
                if paced and r.batches and not self._wanted and not await self._short_of_disk():
                    # after the step before (not after the last); not while a transfer waits
                    # for room (make_room), nor once the disk is short (something else wrote)
                    await pace.rest()
                pace.begin()
                if not loose.exhausted:
                    before = self.clock() - self.config.storage.upload_ttl
                    loose = batch = await reg.db.write_background(
                        evict_loose,
                        need - r.freed,
                        loose.after_digest,
                        before=before,
                        busy=self._busy(),
                    )
                    r.loose += len(batch.evicted)
                else:
                    lru = batch = await reg.db.write_background(
                        evict_lru,
                        need - r.freed,
                        lru.after_row,
                        now=self.clock(),
                        in_use=self.in_use,
                        busy=self._busy(),
                        unit_seconds=lru.unit_seconds,
                    )
                    r.manifests += len(batch.evicted)
                r.batches += 1
                self._forget(batch)
                if deleting is not None:
                    await deleting
                deleting = asyncio.create_task(unlinker.delete(batch.files))
                r.freed += batch.freed
                await self._logged(batch)
                if lru.exhausted:
                    break
            if deleting is not None:
                await deleting
        finally:
            if deleting is not None and not deleting.done():
                deleting.cancel()  # a removal begun runs to its end (regproxy.removal)
                with contextlib.suppress(asyncio.CancelledError):
                    await deleting
            unlinker.close()
        r.seconds = time.monotonic() - started
        return r

    async def _short_of_disk(self) -> bool:
        store = self.registry.store
        total, free = await asyncio.get_running_loop().run_in_executor(None, store.disk_usage)
        return Watermarks.of(self.config.storage, total).short_of_disk(free)

    def _forget(self, batch: Batch) -> None:
        """After a batch committed, before its files go: forget cached lookups of what went."""
        self.registry.cache.forget(
            manifests=batch.rows, bodies=batch.files, tags=batch.tags, links=batch.links
        )
        self.registry.metrics.evicted(batch.freed)

    async def _logged(self, batch: Batch) -> None:
        """Log what a batch evicted, :data:`LOG_SLICE` lines at a time: the requests waiting
        on the event loop go between (30 lines in one go held it ~1 ms)."""
        for i in range(0, len(batch.evicted), LOG_SLICE):
            if i:
                await asyncio.sleep(0)
            for e in batch.evicted[i : i + LOG_SLICE]:
                log.info(
                    "evict.manifest repo=%s digest=%s bytes=%d", e.repo or "-", e.digest, e.bytes
                )


class _Busy(Container[str]):
    """What a batch keeps: a digest served and not written yet (a live view, asked from the
    index's thread) or being fetched (when the batch began)."""

    def __init__(self, served: Container[str], fetching: set[str]) -> None:
        self.served, self.fetching = served, fetching

    def __contains__(self, digest: object) -> bool:
        return digest in self.fetching or digest in self.served


class _Unlinker:
    """Deletes the files of evicted digests, on :data:`UNLINK_THREADS` threads of its own: an
    unlink may wait for the disk (on a filesystem mounted with ``discard``, ext4 trims each
    freed extent before ``unlink`` returns: 0.1-3 ms per file here, one after another), so
    several go at once, and beside the next batch's index work. (Not at a lower CPU priority:
    each thread takes the GIL after every unlink, and the event loop, made to hand the GIL
    over, would wait for a thread the kernel runs last.)

    A file is deleted only if the index, asked after the file was moved out of ``blobs/``, does
    not store its digest again (:mod:`regproxy.removal`: a push, fetch, import or manifest
    ``PUT`` of the same digest, in this process or another, keeps its file)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.pool = ThreadPoolExecutor(
            UNLINK_THREADS, thread_name_prefix="regproxy-unlink", initializer=kernel_name
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False)

    async def delete(self, files: list[str]) -> None:
        if not files:
            return
        db = self.registry.db
        await remove(  # digests parsed on the unlink threads, not on the event loop
            self.registry.store,
            files,
            lambda ds: db.read(Index.stored_among, ds),
            pool=self.pool,
            threads=UNLINK_THREADS,
        )
