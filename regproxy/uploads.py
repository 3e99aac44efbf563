"""Blob upload sessions: monolithic, POST + PUT, chunked PATCHes, status, cancel, expiry.

Spec endpoints end-4a/4b (POST), end-5 (PATCH), end-6 (PUT), end-13 (GET status) and cancel
(DELETE) of https://github.com/opencontainers/distribution-spec/blob/main/spec.md. Knows no HTTP.

A session is a temp file in the store's ``tmp/`` named by its id, its size and the hash state of
what it holds. **An idle session holds no file descriptor**: each PATCH or PUT opens the file,
appends and closes it (the hash state stays in memory), so thousands of abandoned sessions cost
memory, not descriptors. A POST creates no file at all (the first chunk does): on a full disk it
fails with nothing left behind. At most ``uploads.max_sessions`` are open at once; a POST beyond
that is ``429 TOOMANYREQUESTS``. A session untouched for ``storage.upload_ttl`` is removed, and a
restart drops them all (the index rows go at start-up, the files with the ``tmp/`` sweep).

A chunk that fails half-way (the client hung up, the body stalled, the disk filled) is undone:
the file is cut back and the hash state restored, so a retried PATCH continues where the session
was. A bad digest at PUT ends the session.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from regproxy.async_index import AsyncIndex
from regproxy.errors import (
    BlobUploadUnknown,
    RangeNotSatisfiable,
    SizeInvalid,
    StorageFull,
    TooManyRequests,
)
from regproxy.index import Index
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.space import Space
from regproxy.store import BlobWriter, Store

log = logging.getLogger("regproxy.registry")
T = TypeVar("T")
WRITE_BUFFER: Final = 1024 * 1024  # request bytes gathered per executor hop
DEFAULT_MAX_SESSIONS: Final = 1000
#: a body of unknown length (chunked transfer encoding) reserves its room this much at a time:
#: one room check (a statvfs and an index read, off the loop) per 64 MiB written costs nothing
#: next to writing them; when a step does not fit above ``storage.min_free``, what is left
#: above it is held instead, so such a body is refused only when its bytes do not fit
UPLOAD_STEP: Final = 64 * 1024 * 1024

#: verify, move into place and index a written temp file: ``LocalRegistry.commit_blob``
Commit = Callable[[RepoName, BlobWriter, Digest, str], Awaitable[int]]


class Room:
    """The room one request's body holds in :class:`~regproxy.space.Space`, from before its
    first byte is read until the request ends (:meth:`release`, however it ends): all of a
    known ``length`` at :meth:`first`, else :data:`UPLOAD_STEP` more each time what is written
    reaches what is held. Without a space (tools, tests), nothing is reserved."""

    def __init__(
        self,
        space: Space | None,
        repo: str,
        uid: str,
        writer: BlobWriter,
        length: int | None,
        step: int = UPLOAD_STEP,
        kind: str = "upload",
    ) -> None:
        """``kind="import"``: a bundle uploaded for import (regproxy.bundle), ``repo`` naming it."""
        self.space, self.repo, self.uid, self.writer = space, repo, uid, writer
        self.length, self.step, self.kind = length, step, kind
        self.base = writer.size  # what the session held before this request
        self.held = 0
        self.key = object()

    def written(self) -> int:
        return self.writer.size - self.base

    async def first(self) -> None:
        """A body with a length: all of it, before its first byte is read (:class:`NoRoom`)."""
        if self.length:
            await self._hold(self.length, self.length)

    async def cover(self, upto: int) -> None:
        """Room for the body's first ``upto`` bytes, before they are written: a step more, or
        (near the floor) what is left above it, as long as that holds ``upto``."""
        if upto > self.held:
            if self.length is not None:
                await self._hold(upto, upto)
            else:
                await self._hold(max(upto, self.held + self.step), upto, at_least=upto)

    async def _hold(self, size: int, need: int, at_least: int | None = None) -> None:
        if self.space is not None:
            size = await self.space.reserve_upload(
                self.key,
                size,
                self.written,
                whole=self.base + need,
                repo=self.repo,
                uid=self.uid,
                at_least=at_least,
                kind=self.kind,
            )
        self.held = size

    def release(self) -> None:
        if self.space is not None:
            self.space.release(self.key)


@dataclass
class Session:
    uid: str
    repo: str
    #: the temp file and its hash state; closed between requests
    writer: BlobWriter
    lock: asyncio.Lock
    touched: float


class UploadSessions:
    """The open upload sessions of one registry (``registry.uploads``)."""

    def __init__(
        self,
        store: Store,
        db: AsyncIndex,
        commit: Commit,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        metrics: Metrics | None = None,
        space: Space | None = None,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        #: room on disk, shared with pull-through: every body reserves its bytes first
        self.space = space
        #: a body without a length reserves this much at a time
        self.step = UPLOAD_STEP
        self.store = store
        self.db = db
        self.commit = commit
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        call = functools.partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(None, call)

    def _count(self) -> None:
        self.metrics.uploads_in_progress.set(len(self._sessions))

    def close(self) -> None:
        """Forget every session (the daemon stops; start-up sweeps the files)."""
        for s in self._sessions.values():
            s.writer.close()
        self._sessions.clear()
        self._count()

    # --- sessions ---------------------------------------------------------------------------------
    async def start(self, repo: RepoName) -> str:
        """POST: a new session (no file yet); 429 when ``max_sessions`` are open."""
        if len(self._sessions) >= self.max_sessions:
            log.warning(
                "upload.refused repo=%s open=%d max_sessions=%d",
                repo,
                len(self._sessions),
                self.max_sessions,
            )
            raise TooManyRequests(
                f"{len(self._sessions)} upload sessions are open (uploads.max_sessions); "
                "finish or cancel one, or retry later"
            )
        uid = str(uuid.uuid4())
        await self.db.write(Index.add_upload, uid, repo.canonical)
        writer = self.store.writer(uid, deferred=True)
        self._sessions[uid] = Session(uid, repo.canonical, writer, asyncio.Lock(), time.time())
        self._count()
        return uid

    def _get(self, repo: RepoName, uid: str) -> Session:
        s = self._sessions.get(uid)
        if s is None or s.repo != repo.canonical:
            raise BlobUploadUnknown(uid)
        return s

    def _still_open(self, s: Session) -> None:
        """After waiting for a session's lock: a finish, cancel or expiry may have ended it."""
        if self._sessions.get(s.uid) is not s:
            raise BlobUploadUnknown(s.uid)

    def offset(self, repo: RepoName, uid: str) -> int:
        """Bytes the session holds (404 BLOB_UPLOAD_UNKNOWN for an unknown session)."""
        return self._get(repo, uid).writer.size

    async def _end(self, s: Session) -> None:
        """Forget a session and its index row (its file is the caller's business)."""
        self._sessions.pop(s.uid, None)
        self._count()
        await self.db.write(Index.remove_upload, s.uid)

    async def _drain(
        self, writer: BlobWriter, chunks: AsyncIterator[bytes], limit: int | None, room: Room
    ) -> int:
        """Write a request body into an open writer, buffered to few large executor hops, each
        within the room reserved for it (:class:`NoRoom` when a step does not fit)."""
        written = 0
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
            written += len(chunk)
            if limit is not None and written > limit:
                raise SizeInvalid(f"body longer than the declared {limit} bytes")
            await room.cover(written)  # held already, but for a body's next step
            if len(buf) >= WRITE_BUFFER:
                data, buf = bytes(buf), bytearray()
                await self._io(writer.write, data)
        if buf:
            await self._io(writer.write, bytes(buf))
        return written

    def _room(self, s: Session | None, writer: BlobWriter, length: int | None) -> Room:
        repo, uid = (s.repo, s.uid) if s is not None else ("-", "-")
        return Room(self.space, repo, uid, writer, length, self.step)

    async def append(
        self,
        repo: RepoName,
        uid: str,
        chunks: AsyncIterator[bytes],
        *,
        start: int | None = None,
        end: int | None = None,
        length: int | None = None,
    ) -> int:
        """PATCH: append a chunk; ``start``/``end`` from Content-Range must continue the upload.
        ``length`` (Content-Length; else from Content-Range) is reserved before the first byte
        is read: without room the chunk is refused (:class:`NoRoom`) and the session stays."""
        s = self._get(repo, uid)
        async with s.lock:
            self._still_open(s)
            offset = s.writer.size
            if start is not None and start != offset:
                raise RangeNotSatisfiable(
                    f"chunk starts at {start}, upload is at {offset}", offset=offset
                )
            limit = None if end is None or start is None else end - start + 1
            mark = s.writer.mark()
            room = self._room(s, s.writer, length if length is not None else limit)
            try:
                await room.first()
                await self._io(s.writer.reopen)
                written = await self._drain(s.writer, chunks, limit, room)
                if limit is not None and written != limit:
                    raise SizeInvalid(f"Content-Range says {limit} bytes, body had {written}")
            except BaseException:
                s.writer.close()
                await self._undo(s, mark)
                raise
            finally:
                room.release()
            s.writer.close()
            s.touched = time.time()
            return s.writer.size

    async def _undo(self, s: Session, mark: tuple[int, Any]) -> None:
        """Cut a failed chunk off, so a retried PATCH starts where the session was; a file that
        cannot be cut ends the session."""
        if s.writer.size == mark[0]:
            return
        try:
            await self._io(s.writer.rewind, mark)
        except OSError as exc:
            log.warning("upload.broken uuid=%s repo=%s error=%s", s.uid, s.repo, exc)
            await self._io(s.writer.abort)
            await self._end(s)

    async def finish(
        self,
        repo: RepoName,
        uid: str,
        digest: Digest,
        chunks: AsyncIterator[bytes] | None,
        length: int | None = None,
    ) -> int:
        """PUT: take the last bytes, verify the digest, commit. A bad digest ends the upload;
        no room for the last bytes (refused before them, or a step or the disk full among them)
        does not: they are undone and the session stays, to be finished once there is room."""
        s = self._get(repo, uid)
        async with s.lock:
            self._still_open(s)
            mark = s.writer.mark()
            room = self._room(s, s.writer, length if chunks is not None else 0)
            try:
                try:
                    await room.first()
                    await self._io(s.writer.reopen)  # an upload with no PATCH: starts here
                    if chunks is not None:
                        await self._drain(s.writer, chunks, None, room)
                except StorageFull:
                    s.writer.close()
                    await self._undo(s, mark)
                    raise
                try:
                    size = await self.commit(repo, s.writer, digest, f"upload {uid}")
                except BaseException:
                    await self._io(s.writer.abort)
                    raise
                finally:
                    await self._end(s)
            except StorageFull:
                raise
            except BaseException:
                if self._sessions.get(uid) is s:  # the body failed otherwise: the upload ends
                    await self._io(s.writer.abort)
                    await self._end(s)
                raise
            finally:
                room.release()
        return size

    async def cancel(self, repo: RepoName, uid: str) -> None:
        s = self._get(repo, uid)
        async with s.lock:
            self._still_open(s)
            await self._io(s.writer.abort)
            await self._end(s)

    async def expire(self, ttl: float) -> int:
        """Remove sessions untouched for ``ttl`` seconds (storage.upload_ttl)."""
        cutoff = time.time() - ttl
        gone = [s for s in self._sessions.values() if s.touched < cutoff and not s.lock.locked()]
        for s in gone:
            await self._io(s.writer.abort)
            await self._end(s)
            log.info("upload.expired uuid=%s repo=%s", s.uid, s.repo)
        return len(gone)

    # --- one request ------------------------------------------------------------------------------
    async def monolithic(
        self, repo: RepoName, digest: Digest, chunks: AsyncIterator[bytes], length: int | None
    ) -> int:
        """POST ``?digest=`` with the whole blob as its body: no session. Its room is reserved
        before the temp file is made or a byte read (:class:`NoRoom`: nothing is left behind)."""
        writer = self.store.writer(deferred=True)
        room = Room(self.space, repo.canonical, f"monolithic {digest}", writer, length, self.step)
        try:
            await room.first()
            await self._io(writer.reopen)
            try:
                written = await self._drain(writer, chunks, length, room)
                if length is not None and written != length:
                    raise SizeInvalid(f"Content-Length {length}, body {written}")
            except BaseException:
                await self._io(writer.abort)
                raise
            return await self.commit(repo, writer, digest, "monolithic upload")
        finally:
            room.release()
