"""Single-flight blob transfers: one upstream download per digest, tailed by every waiter.

The first miss for a digest starts a :class:`~regproxy.inflight.Transfer` in a task of its own
(a client hanging up does not cancel it). It writes into a temp file of the store while hashing;
every request for the digest reads the growing file (regproxy.inflight), and the last byte of
any response waits for the digest check. A cut transfer is resumed with a Range request where
the source allows it (after a backoff with jitter), then the next source is tried.

The next source **continues** where the last one stopped (a Range request at the bytes in the
file), so responses that already sent bytes go on to the end: every byte of the file is hashed
in order, and the last byte of a response still waits for the whole file's digest check. If a
file of several sources' bytes does not match, none of them is blamed: it starts over, whole,
from the source that finished it (responses that had sent bytes are cut, never finished wrong).
Where the next source sizes the blob otherwise, it starts over from byte 0 too.

Every source has a deadline (regproxy.deadline): its body must keep ``min_rate`` over ``window``
and the whole transfer from it must end within ``max_time``. A source that is too slow is
dropped for this fetch — a stall is not resumed, the next source is tried or the fetch fails —
and the in-flight entry is released either way, so the next request starts afresh. A source that
its owner set aside after a failure (a peer, regproxy.peers) is not tried again either.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from regproxy.deadline import DEFAULT_LIMITS, DEFAULT_TIMING, Pace, Timing, TransferLimits, backoff
from regproxy.errors import (
    BlobUnknown,
    DigestMismatch,
    OCIError,
    StorageFull,
    StoreFailed,
    UpstreamError,
    UpstreamTooSlow,
)
from regproxy.inflight import Transfer, TransferFailed
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.pump import BUFFERS, MOST_BUFFERS, SocketBody, pump
from regproxy.space import NoRoom, Space
from regproxy.store import Store
from regproxy.units import BULK_CHUNK

log = logging.getLogger("regproxy.fetch")
MAX_ATTEMPTS_PER_SOURCE: Final = 3
#: failures worth another attempt at the same source (a refusal, auth or 4xx will not change)
_TRANSIENT: Final = frozenset({"connect", "timeout", "5xx", "error"})
#: threads that copy plain-TCP bodies (regproxy.pump); a transfer beyond them uses the loop
PUMPS: Final = 8
#: a body shorter than this stays on the loop (a thread hop and a connection not reused
#: would cost more than they save)
PUMP_AT_LEAST: Final = BULK_CHUNK
#: buffers (of regproxy.pump.CHUNK bytes) the pumps together may take beyond their first
#: regproxy.pump.BUFFERS each while their hash lags: two pumps' worth of depth at once
PUMP_SPARE_BUFFERS: Final = 2 * (MOST_BUFFERS - BUFFERS)


class Stream(Protocol):
    """An open blob body from some source (see regproxy.upstream.client.BlobStream)."""

    size: int
    offset: int
    source: str

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


@runtime_checkable
class SocketStream(Stream, Protocol):
    """A stream that can hand its body over as a socket for a pump thread."""

    def take_socket(self, at_least: int) -> SocketBody | None: ...


def _always() -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Source:
    """Somewhere a blob may come from: a peer or an upstream (with its mirrors)."""

    name: str
    #: "upstream"; "peer": a lookup of what a peer holds; "home": a peer asked to fetch it
    #: (regproxy.cluster), whose answer may be a transfer of its own
    kind: str
    open: Callable[[Digest, int], Awaitable[Stream]]
    #: called when this source sent bytes that did not match the digest
    on_bad: Callable[[], None] | None = None
    #: how slow it may be, and for how long
    limits: TransferLimits = DEFAULT_LIMITS
    #: called when its answer failed part-way (the body cut, stalled, too slow, missized): a
    #: peer is set aside for it (regproxy.peers)
    on_cut: Callable[[Digest, UpstreamError], None] | None = None
    #: whether another attempt at it is worth making now (False: a peer set aside)
    usable: Callable[[], bool] = _always


#: runs a committed file's settle (blocking) for (repo, digest) after ``on_commit``'s row, and
#: takes the row back when it fails (regproxy.settling)
Settler = Callable[[str, Digest, Callable[[Digest], object]], Awaitable[None]]


async def _settle_only(repo: str, digest: Digest, settle: Callable[[Digest], object]) -> None:
    await asyncio.get_running_loop().run_in_executor(None, settle, digest)


class Fetcher:
    """Owns the in-flight transfers; ``on_commit`` indexes a verified blob, then ``settle``
    makes sure of its file (its row taken back if that fails)."""

    def __init__(
        self,
        store: Store,
        on_commit: Callable[[Digest, int, str, str], Awaitable[None]],
        settle: Settler = _settle_only,
        *,
        timing: Timing = DEFAULT_TIMING,
        metrics: Metrics | None = None,
        space: Space | None = None,
    ) -> None:
        self.store = store
        self.on_commit = on_commit
        self.settle = settle
        #: room reserved before a first byte is written (None: none checked, as for tools)
        self.space = space
        self.metrics = metrics if metrics is not None else Metrics()
        self.timing = timing
        self.inflight: dict[Digest, Transfer] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # one thread each for file writes and hashing: ordered per transfer, parallel to each other
        self._write_thread = ThreadPoolExecutor(2, thread_name_prefix="regproxy-fetch-write")
        self._hash_thread = ThreadPoolExecutor(2, thread_name_prefix="regproxy-fetch-hash")
        self._pump_threads = ThreadPoolExecutor(PUMPS, thread_name_prefix="regproxy-fetch-pump")
        # one hashing thread beside each pump: as many as pumps, so a pump never waits for one
        self._pump_hashing = ThreadPoolExecutor(PUMPS, thread_name_prefix="regproxy-pump-hash")
        self._pump_spare = threading.BoundedSemaphore(PUMP_SPARE_BUFFERS)
        self._pumping = 0

    def get(self, digest: Digest) -> Transfer | None:
        return self.inflight.get(digest)

    def start(self, digest: Digest, sources: list[Source], repo: str) -> Transfer:
        """Join the transfer for digest, or start one that tries sources in order."""
        t = self.inflight.get(digest)
        if t is not None:
            return t
        t = Transfer(digest, self.store, self.metrics)
        t.kinds = frozenset(s.kind for s in sources)
        self.inflight[digest] = t
        self.metrics.inflight_fetches.set(len(self.inflight))
        task = asyncio.create_task(self._run(t, sources, repo), name=f"fetch {digest}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return t

    async def drain(self, within: float) -> None:
        """Shutdown: let the transfers in flight finish ``within`` seconds, then cut the rest
        (their temp files removed, their waiters failed) and log how many were cut."""
        tasks = [task for task in self._tasks if not task.done()]
        cut: set[asyncio.Task[None]] = set()
        if tasks:
            log.info("shutdown.draining transfers=%d within_s=%.0f", len(tasks), within)
            _, cut = await asyncio.wait(tasks, timeout=max(within, 0.0))
            for task in cut:
                task.cancel()
            await asyncio.gather(*cut, return_exceptions=True)
            log.log(
                logging.WARNING if cut else logging.INFO,
                "shutdown.transfers finished=%d cut=%d",
                len(tasks) - len(cut),
                len(cut),
            )
        self._write_thread.shutdown(wait=True)
        self._hash_thread.shutdown(wait=True)
        self._pump_threads.shutdown(wait=True)
        self._pump_hashing.shutdown(wait=True)

    async def _run(self, t: Transfer, sources: list[Source], repo: str) -> None:
        loop = asyncio.get_running_loop()
        error: OCIError | None = None
        t.repo = repo
        try:
            t.writer = await loop.run_in_executor(None, self.store.writer)
            last: OCIError = BlobUnknown(str(t.digest))
            i = 0
            while i < len(sources):
                source, more = sources[i], i + 1 < len(sources)
                t.kinds = frozenset(s.kind for s in sources[i:])
                try:
                    await self._from_source(t, source)
                except (BlobUnknown, UpstreamError) as exc:
                    last = exc
                    if isinstance(exc, UpstreamTooSlow):  # the transports count the others
                        self.metrics.meters_for(source.kind).failed(source.name, exc.kind)
                    if not isinstance(exc, BlobUnknown):
                        log.warning(
                            "fetch.source_failed digest=%s repo=%s source=%s kind=%s "
                            "offset=%d error=%s",
                            t.digest,
                            repo,
                            source.name,
                            source.kind,
                            t.written,
                            exc,
                        )
                    if t.written and more:  # else the end cuts its readers
                        self._continue(t, source, sources[i + 1])
                    i += 1
                    continue
                try:
                    commit = functools.partial(t.writer.commit, t.digest, source=t.source)
                    await loop.run_in_executor(None, commit)
                except DigestMismatch as exc:
                    if t.mixed:  # several sources' bytes: none is blamed; this one, whole
                        log.warning(
                            "fetch.mixed_mismatch digest=%s repo=%s source=%s actual=%s",
                            t.digest,
                            repo,
                            t.source,
                            exc.actual,
                        )
                        await self._next_generation(t, source)
                        continue
                    meters = self.metrics.meters_for(source.kind)
                    meters.failed(source.name, "digest_mismatch")
                    log.error(
                        "fetch.digest_mismatch digest=%s repo=%s source=%s actual=%s",
                        t.digest,
                        repo,
                        t.source,
                        exc.actual,
                    )
                    if source.on_bad is not None:
                        source.on_bad()
                    last = TransferFailed(
                        f"{t.digest}: {t.source} sent bytes that hash to {exc.actual}"
                    )
                    if more:
                        await self._next_generation(t, source)
                    i += 1
                    continue
                break
            else:
                raise last
            assert t.size is not None
            try:
                await self.on_commit(t.digest, t.size, repo, t.source)
            finally:  # the file is still in place (see regproxy.removal)
                await self.settle(repo, t.digest, t.writer.settle)
            t.committed = True
            log.info(
                "fetch.committed digest=%s repo=%s source=%s kind=%s copy=%s bytes=%d "
                "seconds=%.2f waiters=%d dropped=%d",
                t.digest,
                repo,
                t.source,
                t.kind,
                t.copy,
                t.size,
                time.monotonic() - t.started,
                t.waiters,
                t.writer.dropped,
            )
            await t.drop_committed()
        except OCIError as exc:
            error = exc
            if isinstance(exc, StorageFull | StoreFailed) and not isinstance(exc, NoRoom):
                self._store_failed(t, repo, exc)
            elif not isinstance(exc, BlobUnknown):
                log.warning("fetch.failed digest=%s repo=%s error=%s", t.digest, repo, exc)
        except Exception as exc:  # a bug or a disk error: never leave waiters hanging
            log.exception("fetch.crashed digest=%s repo=%s", t.digest, repo)
            error = TransferFailed(f"{t.digest}: {exc}")
        finally:
            # clean up before the failure is published: a waiter that sees it may act at once
            if self.space is not None:
                self.space.release(t)
            if not t.committed and t.writer is not None:
                with contextlib.suppress(OSError):
                    await loop.run_in_executor(None, t.writer.abort)
            if not t.committed and t.error is None:
                t.error = error or TransferFailed(f"{t.digest}: transfer ended")
            self.inflight.pop(t.digest, None)
            self.metrics.inflight_fetches.set(len(self.inflight))
            t.notify()

    def _store_failed(self, t: Transfer, repo: str, exc: OCIError) -> None:
        """Our own disk failed a write or the commit (full, EIO): no source is blamed or set
        aside, and no next one is tried (it would land on the same disk)."""
        reason = "no_space" if isinstance(exc, StorageFull) else "io"
        self.metrics.fetch_store_errors.labels(reason).inc()
        log.error(
            "fetch.store_failed digest=%s repo=%s path=%s offset=%d reason=%s error=%s",
            t.digest,
            repo,
            t.writer.path if t.writer is not None else self.store.tmp,
            t.written,
            reason,
            exc.detail,
        )

    def _continue(self, t: Transfer, left: Source, to: Source) -> None:
        """The next source goes on from the bytes in the file (a Range request): readers
        keep them, and keep sending."""
        t.mixed = True
        self.metrics.fetch_switches.labels(left.kind, "continued").inc()
        log.info(
            "fetch.continue digest=%s repo=%s source=%s next=%s next_kind=%s offset=%d",
            t.digest,
            t.repo,
            left.name,
            to.name,
            to.kind,
            t.written,
        )

    async def _next_generation(self, t: Transfer, left: Source) -> None:
        """Start over in a new temp file (for the next source, or this one again from byte
        0); readers that already sent bytes of the old one are cut, the others follow the
        new file."""
        loop = asyncio.get_running_loop()
        if t.written:
            self.metrics.fetch_switches.labels(left.kind, "restarted").inc()
        old = t.writer
        t.writer = await loop.run_in_executor(None, self.store.writer)
        t.written = 0
        t.mixed = False
        t.generation += 1
        if old is not None:
            await loop.run_in_executor(None, old.abort)
        t.notify()

    @staticmethod
    def _landed(t: Transfer, n: int, write: asyncio.Future[Any]) -> None:
        """A chunk of ``n`` bytes reached the file (and its hash): readers may have it."""
        if not write.cancelled() and write.exception() is None:
            t.written += n
            t.notify()

    async def _from_source(self, t: Transfer, source: Source) -> None:
        """Copy from one source; a cut is resumed with Range after a backoff, a few attempts at
        most; a source too slow for its limits is dropped at once (UpstreamTooSlow)."""
        deadline = self.timing.now() + source.limits.max_time
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._attempt(t, source, deadline)
                return
            except UpstreamTooSlow:
                raise
            except UpstreamError as exc:
                if (
                    attempts >= MAX_ATTEMPTS_PER_SOURCE
                    or exc.kind not in _TRANSIENT
                    or not source.usable()
                ):
                    raise
                delay = backoff(attempts, self.timing.random)
                log.info(
                    "fetch.resume digest=%s source=%s offset=%d attempt=%d backoff_s=%.2f error=%s",
                    t.digest,
                    source.name,
                    t.written,
                    attempts + 1,
                    delay,
                    exc,
                )
                await self.timing.sleep(delay)

    async def _attempt(self, t: Transfer, source: Source, deadline: float) -> None:
        """One request to the source: open, then copy until the end, the pace kept throughout."""
        assert t.writer is not None
        offset = t.written
        stream = await self._open(t, source, offset, deadline)
        if t.mixed and offset and stream.size != t.size:
            # the bytes in hand came from a source that sized the blob otherwise: from 0
            log.warning(
                "fetch.size_differs digest=%s repo=%s source=%s size=%d expected=%s",
                t.digest,
                t.repo,
                source.name,
                stream.size,
                t.size,
            )
            await stream.close()
            await self._next_generation(t, source)
            offset = 0
            stream = await self._open(t, source, offset, deadline)
        try:
            pace = Pace(source.limits, self.timing.now, deadline)
            t.source, t.kind = stream.source, source.kind
            if t.size is None or (t.written == 0 and stream.size != t.size):
                # nothing written yet (the first source, or a fresh file after one that
                # lied): this source's size holds; readers sized otherwise are cut; room for
                # it first (regproxy.space: 507 before any byte when there is none)
                if self.space is not None:
                    await self.space.reserve(
                        t,
                        stream.size,
                        lambda: t.written,
                        digest=t.digest,
                        repo=t.repo,
                        source=stream.source,
                    )
                t.size = stream.size
                t.notify()
            elif stream.size != t.size:
                raise UpstreamError(source.name, f"size {stream.size}, expected {t.size}")
            if self.store.drop_above and t.size > self.store.drop_above:
                # from the first byte, below its readers' places (the writer would drop
                # behind by itself only past the threshold, and with no readers to wait for)
                t.writer.drop_behind(t.read_floor)
            if stream.offset not in (0, offset):  # a Range answer that starts elsewhere
                raise UpstreamError(
                    source.name, f"range answer from byte {stream.offset}, asked from {offset}"
                )
            skip = offset - stream.offset  # source ignored our Range: drop what we have
            fetched = self.metrics.meters_for(source.kind).fetched_from(source.name)
            body = None
            if skip == 0 and isinstance(stream, SocketStream) and self._pumping < PUMPS:
                body = stream.take_socket(PUMP_AT_LEAST)
            t.copy = "loop" if body is None else "thread"
            if body is not None:  # plain TCP: the body goes on a thread of its own
                await self._pump(t, source.name, body, pace, fetched)
            else:
                await self._copy(t, source.name, stream, pace, skip, fetched)
            if t.written != t.size:
                raise UpstreamError(source.name, f"body ended at {t.written} of {t.size}")
        except UpstreamError as exc:
            if source.on_cut is not None:
                source.on_cut(t.digest, exc)
            raise
        finally:
            await stream.close()

    async def _open(self, t: Transfer, source: Source, offset: int, deadline: float) -> Stream:
        opening = asyncio.timeout(max(0.0, deadline - self.timing.now()))
        try:
            async with opening:
                return await source.open(t.digest, offset)
        except TimeoutError:
            if not opening.expired():
                raise
            raise UpstreamTooSlow(source.name, "no answer within max_transfer_time") from None

    async def _pump(
        self,
        t: Transfer,
        source: str,
        body: SocketBody,
        pace: Pace,
        fetched: Callable[[int], None],
    ) -> None:
        """The body from its socket into the file on a pump thread (regproxy.pump); readers hear
        of every chunk once it is in the file."""
        loop = asyncio.get_running_loop()
        assert t.writer is not None
        generation = t.generation
        stop = threading.Event()

        def advance(n: int) -> None:  # on the loop, in the order the thread landed them
            if t.generation == generation:
                t.written += n
                fetched(n)
                t.notify()

        def landed(n: int) -> None:  # on the pump's thread
            loop.call_soon_threadsafe(advance, n)

        job = functools.partial(
            pump,
            body,
            t.writer,
            source=source,
            pace=pace,
            landed=landed,
            stop=stop,
            hashing=self._pump_hashing,
            spare=self._pump_spare,
        )
        self._pumping += 1
        done = loop.run_in_executor(self._pump_threads, job)
        try:
            with body.guard():
                await asyncio.shield(done)
        finally:
            self._pumping -= 1
            if not done.done():  # cancelled: the thread must be off the file before it goes
                stop.set()
                body.interrupt()
                while not done.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait([done])
            if not done.cancelled():
                done.exception()  # seen: a cut pump's own error is no news
            body.close()

    async def _copy(
        self,
        t: Transfer,
        source: str,
        stream: Stream,
        pace: Pace,
        skip: int,
        fetched: Callable[[int], None],
    ) -> None:
        """The body chunk by chunk through the loop (TLS, chunked, small, or every pump busy):
        each chunk written and hashed on threads while the next one arrives."""
        loop = asyncio.get_running_loop()
        assert t.size is not None
        # one write (with its hashing) in flight while the next chunk arrives
        pending: asyncio.Future[Any] | None = None
        chunks = aiter(stream.chunks())
        try:
            while True:
                # only the wait for bytes is timed: a write in flight is never cut
                watchdog = asyncio.timeout(pace.time_left())
                try:
                    async with watchdog:
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if not watchdog.expired():
                        raise
                    raise UpstreamTooSlow(source, pace.shortfall() or "no progress") from None
                pace.add(len(chunk))
                why = pace.shortfall()
                if why is not None:
                    raise UpstreamTooSlow(source, why)
                if skip > 0:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                if pending is not None:
                    await pending
                if t.written + len(chunk) > t.size:
                    raise UpstreamError(source, f"sent more than {t.size} bytes")
                writer = t.writer
                assert writer is not None
                pending = asyncio.gather(  # file and hash side by side, in order
                    loop.run_in_executor(self._write_thread, writer.write_unhashed, chunk),
                    loop.run_in_executor(self._hash_thread, writer.hash, chunk),
                )
                # readers have it once it is in the file, not when the next chunk comes (an
                # upstream that stalls would hold back the last chunk it sent)
                pending.add_done_callback(functools.partial(self._landed, t, len(chunk)))
                fetched(len(chunk))
        finally:
            if pending is not None:
                await pending
