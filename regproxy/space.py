"""Room on disk for pull-through blobs and pushed bodies, reserved before their first byte.

Pushes (regproxy.uploads) reserve here too, with :meth:`Space.reserve_upload`: a body with a
length all of it before it is read, a streamed one a step at a time; the same floor, the same
eviction ask, logged as ``upload.no_space`` and counted in ``regproxy_upload_refused_total``.
Fetches and pushes in flight thus see each other's reservations.

A transfer (regproxy.fetch) learns the blob's size from its source's answer (a registry blob GET
always carries it: an answer without a Content-Length is refused by the upstream client) and
reserves it here before it writes anything. Two limits, of two kinds:

* ``storage.min_free`` is a floor: the filesystem's free bytes, less what other reservations
  still have to write, less this blob, stay at or above it (0: the disk itself). Two 3 GiB
  misses on 5 GiB free therefore do not both start. A blob under the floor waits for the
  evictor (regproxy.evict, which hands itself in with :meth:`Space.room_from`) to free the
  shortfall: one ask at a time, waited for at most ``wait`` seconds (the round goes on in the
  background after that), and only what eviction may remove goes (unpinned, least recently
  used, never in use or being fetched). Measured again, a blob that still does not fit is
  refused with :class:`NoRoom` (507) before any byte is sent, logged as ``fetch.no_space`` and
  counted in ``regproxy_fetch_refused_total{reason="no_space"}``.
* ``storage.max_size`` is the cache's size, as everywhere else a target eviction works
  towards, not a wall: a blob that takes the store (with every reservation) over it is fetched
  at once, and an eviction round for the excess is started, not waited for (logged as
  ``fetch.over_max_size``). A node at its limit thus never fails or slows a pull because
  eviction has not caught up, or because what it could evict is pinned or was used seconds
  ago; the store comes back under the limit as soon as eviction may free enough.

A blob larger than ``max_size``, or than the filesystem less ``min_free``, can never be kept:
it is refused at once, nothing evicted (``reason="too_large"``; fetching it would evict the
whole cache to hold it for a moment).

A reservation is released when its transfer ends, however it ends (the fetcher's ``finally``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Final

from regproxy.config import StorageConfig
from regproxy.errors import StorageFull
from regproxy.metrics import Metrics
from regproxy.oci import Digest

log = logging.getLogger("regproxy.space")
#: the longest a transfer waits for eviction to make room before it is refused
ROOM_WAIT: Final = 10.0


class NoRoom(StorageFull):
    """A pull-through blob that does not fit: 507 before its first byte."""


@dataclass(slots=True)
class _Held:
    size: int
    #: bytes of it in the file so far (already counted by the filesystem's free bytes)
    written: Callable[[], int]

    @property
    def unwritten(self) -> int:
        return max(0, self.size - self.written())


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a blob compares with the room there is (all in bytes)."""

    short: int  # bytes missing above the floor, min_free (0: it fits there)
    over: int  # bytes over max_size (a target: fetched anyway, eviction started)
    reason: str  # "" (fits), "no_space" (under the floor), "too_large"
    free: int  # the filesystem's free bytes, as measured
    stored: int
    reserved: int  # by other transfers
    limit: int | None  # max_size, resolved
    floor: int  # min_free, resolved

    def why(self) -> str:
        """The refusal's detail, after what was refused: size and room."""
        return (
            (
                "more than the cache may ever hold"
                if self.reason == "too_large"
                else f"{self.short} bytes more than there is room for"
            )
            + f" (free {self.free}, min_free {self.floor}, stored {self.stored}, "
            f"max_size {self.limit if self.limit is not None else '-'}, "
            f"reserved by transfers in flight {self.reserved})"
        )


class Space:
    """The reservations of the transfers in flight, and the checks against the watermarks."""

    def __init__(
        self,
        storage: StorageConfig,
        disk: Callable[[], tuple[int, int]],
        stored: Callable[[], Awaitable[int]],
        metrics: Metrics | None = None,
        *,
        wait: float = ROOM_WAIT,
    ) -> None:
        """``disk``: (total, free) bytes of the store's filesystem (blocking: run off the loop);
        ``stored``: the bytes the store holds (the index's running total)."""
        self.storage = storage
        self.disk = disk
        self.stored = stored
        self.metrics = metrics if metrics is not None else Metrics()
        self.wait = wait
        self._held: dict[Hashable, _Held] = {}
        self._make_room: Callable[[int], Awaitable[object]] | None = None
        self._asking = asyncio.Lock()
        #: eviction rounds asked for and still running (a refused transfer does not wait)
        self.asks: set[asyncio.Task[object]] = set()

    def room_from(self, make_room: Callable[[int], Awaitable[object]] | None) -> None:
        """Who frees bytes when a blob does not fit (the evictor; None: nobody)."""
        self._make_room = make_room

    async def stop(self) -> None:
        """Nobody frees bytes from now on (shutdown): the rounds asked for and still running
        are cut, as the evictor's own round is, and waited for (none outlives the evictor)."""
        self._make_room = None
        rounds = list(self.asks)
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)

    @property
    def reserved(self) -> int:
        return sum(h.size for h in self._held.values())

    def release(self, key: Hashable) -> None:
        self._held.pop(key, None)

    async def reserve(
        self,
        key: Hashable,
        size: int,
        written: Callable[[], int],
        *,
        digest: Digest,
        repo: str,
        source: str,
    ) -> None:
        """Reserve ``size`` bytes for ``key`` (replacing what it held), making room if need be;
        :class:`NoRoom` when there is none to be had."""
        self.release(key)
        v = await self._room(size, size, size, str(digest))
        if not v.reason and v.over:
            self._past_target(v, size, digest, repo, source)
        if v.reason:
            self.metrics.fetch_refused.labels(v.reason).inc()
            log.warning(
                "fetch.no_space digest=%s repo=%s upstream=%s size=%d free=%d stored=%d "
                "reserved=%d max_size=%s min_free=%d short=%d reason=%s",
                digest,
                repo,
                source,
                size,
                v.free,
                v.stored,
                v.reserved,
                v.limit if v.limit is not None else "-",
                v.floor,
                v.short,
                v.reason,
            )
            raise NoRoom(f"{digest} is {size} bytes: " + v.why())
        self._held[key] = _Held(size, written)  # no await since the measure: no other fits in

    async def reserve_upload(
        self,
        key: Hashable,
        size: int,
        written: Callable[[], int],
        *,
        whole: int,
        repo: str,
        uid: str,
        at_least: int | None = None,
        kind: str = "upload",
    ) -> int:
        """Reserve ``size`` bytes of a pushed body for ``key`` (replacing what it held, of which
        ``written()`` bytes are in its file already), the same way as :meth:`reserve`: the floor
        and the eviction ask are the same, and pushes and fetches see each other's reservations.
        ``whole`` is what the blob is then sure to hold (the session's earlier chunks and this
        body): larger than the cache may ever hold, it is refused (``too_large``). ``at_least``
        (a step of a body of unknown length): when ``size`` does not fit, what does is held if it
        is ``at_least``. Returns the bytes held; :class:`NoRoom` before the body's next byte
        when there is no room.

        ``kind="import"``: a bundle's file (or an uploaded bundle) on its way into the store,
        ``repo`` naming the bundle and ``uid`` the file; logged as ``import.*`` and counted in
        ``regproxy_import_refused_total`` instead."""
        self.release(key)
        pending = max(0, size - written())
        v = await self._room(pending, size, whole, f"{kind} {uid}")
        if v.reason == "no_space" and at_least is not None:
            spare = size - at_least  # of the step, what the body has not come to yet
            if v.short <= spare:
                size, v = size - v.short, dataclasses.replace(v, short=0, reason="")
            else:
                v = dataclasses.replace(v, short=v.short - spare)
        keys = "bundle=%s file=%s" if kind == "import" else "repo=%s uuid=%s"
        if not v.reason and v.over:
            log.info(
                f"{kind}.over_max_size {keys} size=%d stored=%d reserved=%d "
                "max_size=%s over=%d (written; eviction started)",
                repo,
                uid,
                whole,
                v.stored,
                v.reserved,
                v.limit,
                v.over,
            )
            self._evict_excess(v.over, f"{kind} {uid}")
        if v.reason:
            refused = (
                self.metrics.import_refused if kind == "import" else self.metrics.upload_refused
            )
            refused.labels(v.reason).inc()
            log.warning(
                f"{kind}.no_space {keys} size=%d free=%d min_free=%d stored=%d "
                "reserved=%d max_size=%s short=%d reason=%s",
                repo,
                uid,
                whole,
                v.free,
                v.floor,
                v.stored,
                v.reserved,
                v.limit if v.limit is not None else "-",
                v.short,
                v.reason,
            )
            what = f"upload {uid} would hold"
            if kind == "import":
                what = f"bundle file {uid!r} is" if uid != "-" else f"the bundle ({repo}) is"
            raise NoRoom(f"{what} {whole} bytes: " + v.why())
        self._held[key] = _Held(size, written)  # no await since the measure: no other fits in
        return size

    async def never_kept(self, size: int, *, digest: Digest, repo: str, source: str) -> None:
        """:class:`NoRoom` for a blob of ``size`` bytes that can never be kept (``too_large``:
        larger than ``max_size``, or than the filesystem less ``min_free``), as its GET would
        be refused: what a HEAD of a blob not held answers (regproxy.proxy). A permanent
        property of the size, so no reservation and no eviction; not counted in
        ``regproxy_fetch_refused_total`` (a HEAD transfers nothing), logged as
        ``blob.head_too_large``. Room above ``min_free``, which changes, is not checked."""
        v = await self._verdict(0, 0, size)
        if v.reason != "too_large":
            return
        log.info(
            "blob.head_too_large digest=%s repo=%s upstream=%s size=%d free=%d max_size=%s "
            "min_free=%d",
            digest,
            repo,
            source,
            size,
            v.free,
            v.limit if v.limit is not None else "-",
            v.floor,
        )
        raise NoRoom(f"{digest} is {size} bytes: " + v.why())

    async def _room(self, pending: int, size: int, whole: int, who: str) -> Verdict:
        """The verdict on ``pending`` more bytes on disk (``size`` held in all, for a blob of
        at least ``whole``), after one bounded eviction ask when they are under the floor."""
        v = await self._verdict(pending, size, whole)
        if v.reason == "no_space" and self._make_room is not None and await self._turn():
            try:  # one ask at a time; the one before may have made room
                v = await self._verdict(pending, size, whole)
                if v.reason == "no_space":
                    await self._ask(max(v.short, v.over), who)
            finally:
                self._asking.release()
            v = await self._verdict(pending, size, whole)
        return v

    def _past_target(self, v: Verdict, size: int, digest: Digest, repo: str, source: str) -> None:
        """The blob takes the store over max_size: it is fetched, and eviction is started for
        the excess (unless a round is running already), never waited for."""
        log.info(
            "fetch.over_max_size digest=%s repo=%s upstream=%s size=%d stored=%d reserved=%d "
            "max_size=%s over=%d (fetched; eviction started)",
            digest,
            repo,
            source,
            size,
            v.stored,
            v.reserved,
            v.limit,
            v.over,
        )
        self._evict_excess(v.over, str(digest))

    def _evict_excess(self, over: int, who: str) -> None:
        if self._make_room is not None and not self.asks and not self._asking.locked():
            _ = self._start(over, who)  # kept in self.asks until it ends

    async def _verdict(self, pending: int, size: int, whole: int) -> Verdict:
        """``pending``: bytes still to be written (under the floor?); ``size``: the reservation
        (over max_size?); ``whole``: the blob's size (can it ever fit?)."""
        loop = asyncio.get_running_loop()
        total, free = await loop.run_in_executor(None, self.disk)
        max_size, min_free = self.storage.max_size, self.storage.min_free
        stored = await self.stored() if max_size else 0
        limit = max_size.resolve(total) if max_size else None
        floor = min_free.resolve(total) if min_free else 0
        reserved = self.reserved
        unwritten = sum(h.unwritten for h in self._held.values())
        over = max(0, stored + reserved + size - limit) if limit is not None else 0
        short = max(0, floor + unwritten + pending - free)
        if (limit is not None and whole > limit) or whole + floor > total:
            reason = "too_large"
        else:
            reason = "no_space" if short else ""
        return Verdict(short, over, reason, free, stored, reserved, limit, floor)

    async def _turn(self) -> bool:
        """Wait at most ``wait`` for the turn to ask (another transfer's ask is running)."""
        if not self._asking.locked():
            return await self._asking.acquire()
        try:
            async with asyncio.timeout(self.wait):
                return await self._asking.acquire()
        except TimeoutError:
            return False

    async def _ask(self, need: int, who: str) -> None:
        """Ask for ``need`` bytes and wait for the round a bounded time (never cut it)."""
        assert self._make_room is not None
        log.info("space.making_room for=%s need=%d", who, need)
        await asyncio.wait([self._start(need, who)], timeout=self.wait)

    def _start(self, need: int, who: str) -> asyncio.Task[object]:
        """An eviction round for ``need`` bytes, running on its own (kept in :attr:`asks`)."""
        make_room = self._make_room
        assert make_room is not None

        async def round_() -> object:
            return await make_room(need)

        task = asyncio.create_task(round_(), name=f"make room {who}")
        self.asks.add(task)
        task.add_done_callback(self._asked)
        return task

    def _asked(self, task: asyncio.Task[object]) -> None:
        self.asks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("fetch.making_room_failed error=%s", task.exception())
