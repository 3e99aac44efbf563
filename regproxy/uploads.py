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
    TooManyRequests,
)
from regproxy.index import Index
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.store import BlobWriter, Store

log = logging.getLogger("regproxy.registry")
T = TypeVar("T")
WRITE_BUFFER: Final = 1024 * 1024  # request bytes gathered per executor hop
DEFAULT_MAX_SESSIONS: Final = 1000

#: verify, move into place and index a written temp file: ``LocalRegistry.commit_blob``
Commit = Callable[[RepoName, BlobWriter, Digest, str], Awaitable[int]]


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
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
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
        self, writer: BlobWriter, chunks: AsyncIterator[bytes], limit: int | None
    ) -> int:
        """Write a request body into an open writer, buffered to few large executor hops."""
        written = 0
        buf = bytearray()
        async for chunk in chunks:
            buf += chunk
            written += len(chunk)
            if limit is not None and written > limit:
                raise SizeInvalid(f"body longer than the declared {limit} bytes")
            if len(buf) >= WRITE_BUFFER:
                data, buf = bytes(buf), bytearray()
                await self._io(writer.write, data)
        if buf:
            await self._io(writer.write, bytes(buf))
        return written

    async def append(
        self,
        repo: RepoName,
        uid: str,
        chunks: AsyncIterator[bytes],
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> int:
        """PATCH: append a chunk; ``start``/``end`` from Content-Range must continue the upload."""
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
            try:
                await self._io(s.writer.reopen)
                written = await self._drain(s.writer, chunks, limit)
                if limit is not None and written != limit:
                    raise SizeInvalid(f"Content-Range says {limit} bytes, body had {written}")
            except BaseException:
                s.writer.close()
                await self._undo(s, mark)
                raise
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
        self, repo: RepoName, uid: str, digest: Digest, chunks: AsyncIterator[bytes] | None
    ) -> int:
        """PUT: take the last bytes, verify the digest, commit. A bad digest ends the upload."""
        s = self._get(repo, uid)
        async with s.lock:
            self._still_open(s)
            try:
                await self._io(s.writer.reopen)  # an upload with no PATCH: the file starts here
                if chunks is not None:
                    await self._drain(s.writer, chunks, None)
                size = await self.commit(repo, s.writer, digest, f"upload {uid}")
            except BaseException:
                await self._io(s.writer.abort)
                raise
            finally:
                await self._end(s)
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
        """POST ``?digest=`` with the whole blob as its body: no session."""
        writer = await self._io(self.store.writer)
        try:
            written = await self._drain(writer, chunks, length)
            if length is not None and written != length:
                raise SizeInvalid(f"Content-Length {length}, body {written}")
        except BaseException:
            await self._io(writer.abort)
            raise
        return await self.commit(repo, writer, digest, "monolithic upload")
