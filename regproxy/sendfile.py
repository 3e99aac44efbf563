"""Blob files to clients, driven by the event loop (the HTTP side of serving a file).

No thread and no slot is tied to a client's pace:

- Plain HTTP: ``sendfile(2)`` on the connection's non-blocking socket, called from the loop
  until the socket buffer is full (``EAGAIN``); then the response waits for the socket to become
  writable (``loop.add_writer`` on a duplicate of its descriptor: the transport owns the
  original). No byte passes through Python. A fast client gets at most ``TURN`` bytes per wake-up
  before the loop serves others.
- TLS: the bytes must go through the TLS transport; they are read with ``pread`` and written
  with the transport's flow control.

The disk must not stall the loop either: the blob file is opened on the loop only when its
path is all in the kernel's caches (regproxy.cached_open), else on a worker thread; before a
``WINDOW`` of the file is sent, a ``preadv(RWF_NOWAIT)`` probe asks whether its pages are in
the page cache; if not, a worker thread reads the window in first (a bounded disk read, not the
client's pace).

A response that makes no progress for ``http.write_timeout`` is dropped; a client that hangs up
is one access line (``error=client_gone``), and the access line counts the body bytes sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Final

from aiohttp import web

from regproxy.cached_open import open_cached
from regproxy.errors import BlobUnknown
from regproxy.oci import Digest
from regproxy.request_limits import app_metrics, http_limits
from regproxy.units import BLOB_CHUNK
from regproxy.web_keys import notes

log = logging.getLogger("regproxy.api")
WINDOW: Final = 1024 * 1024  # bytes checked for page-cache residency at once
TURN: Final = 4 * 1024 * 1024  # bytes sent to one client per wake-up before yielding
#: a client gone away: the socket errors of a peer that reset or closed its end
CLIENT_GONE: Final = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Stalled(TimeoutError):
    """The client took no bytes for ``http.write_timeout``."""


class _ShortFile(EOFError):
    """The blob file ended before its recorded size (damage on disk)."""


#: what cuts a response short on the way out: a client gone or stalled, a file cut short
SEND_ERRORS: Final = (*CLIENT_GONE, Stalled, _ShortFile)


class _Sent:
    """Body bytes that reached the socket so far."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def note_body(request: web.BaseRequest, sent: int) -> None:
    """The body bytes of this response, for its access line."""
    notes(request)["body_bytes"] = str(sent)


def note_cut(request: web.Request, digest: Digest, exc: BaseException) -> None:
    """Mark a response cut short in its access line; log it unless the client just left.

    A client that hangs up or stops reading is routine (one access line, at INFO); a blob file
    shorter than its record is damage (a WARNING as well).
    """
    noted = notes(request)
    if isinstance(exc, CLIENT_GONE):
        noted["error"] = "client_gone"
    elif isinstance(exc, Stalled):
        noted["error"] = "client_stalled"
        app_metrics(request.app).slow_clients_cut.labels("write").inc()
    else:
        noted["error"] = "aborted"
        log.warning("blob.aborted digest=%s repo=%s error=%r", digest, noted.get("repo"), exc)


# --- the disk side ----------------------------------------------------------------------------------
_probe = bytearray(1)
_nowait: bool = hasattr(os, "RWF_NOWAIT")


def _cached(fd: int, offset: int, count: int) -> bool:
    """Whether the first and last byte of a range are in the page cache (no disk wait)."""
    global _nowait
    if not _nowait:
        return True
    try:
        for pos in (offset, offset + count - 1):
            os.preadv(fd, [_probe], pos, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as exc:  # a filesystem without RWF_NOWAIT: assume cached from now on
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        _nowait = False
    return True


#: bytes past a window that had to come from disk which the kernel is asked to read meanwhile
#: (it caps one such request at the disk's read-ahead or request size, whichever is larger)
READ_AHEAD: Final = 8 * 1024 * 1024
_buffers = threading.local()


def _read_in(fd: int, offset: int, count: int) -> None:
    """Bring a range into the page cache (on a worker thread: it waits for the disk), and ask
    the kernel to read the :data:`READ_AHEAD` bytes after it meanwhile (``WILLNEED`` starts the
    reads and returns), so the next windows are on their way while this one is sent. Read into
    the thread's own buffer: the bytes only pass through it (a fresh one per window cost a
    fresh page of memory every 4 KiB: on the test VM a 1 GiB blob from disk went at 0.47 GB/s
    so, 0.96 GB/s with this, benchmarks/README.md "Cold pull, fourth pass")."""
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset + count, READ_AHEAD, os.POSIX_FADV_WILLNEED)
    buf = getattr(_buffers, "buf", None)
    if buf is None or len(buf) < count:
        buf = _buffers.buf = bytearray(max(count, WINDOW))
    os.preadv(fd, [memoryview(buf)[:count]], offset)


async def _warm(loop: asyncio.AbstractEventLoop, fd: int, offset: int, count: int) -> None:
    if not _cached(fd, offset, count):
        await loop.run_in_executor(None, _read_in, fd, offset, count)


def in_page_cache(fd: int, offset: int, count: int) -> bool:
    """Whether ``sendfile`` of this range may run on the loop (as ``_sendfile``'s windows: the
    first and last byte in the page cache; taken as so where ``RWF_NOWAIT`` is not known)."""
    return _cached(fd, offset, count)


def read_in(fd: int, offset: int, count: int) -> None:
    """Bring a range into the page cache (on a worker thread: it waits for the disk)."""
    _read_in(fd, offset, count)


def readable_now(fd: int, offset: int, count: int) -> bool:
    """Whether ``pread`` of this range may run on the loop: its first and last byte are in the
    page cache (as for ``sendfile``'s windows), known by a ``RWF_NOWAIT`` probe."""
    return _cached(fd, offset, count) and _nowait


async def _read(loop: asyncio.AbstractEventLoop, fd: int, offset: int, count: int) -> bytes:
    """``count`` bytes at ``offset``: on the loop when they are cached (first and last byte, as
    for ``sendfile``), else on a worker. ``pread`` into a fresh ``bytes`` handed to the transport
    as it is: no zero-filled buffer first, no copy after."""
    if readable_now(fd, offset, count):
        return os.pread(fd, count, offset)
    return await loop.run_in_executor(None, os.pread, fd, count, offset)


# --- the socket side -------------------------------------------------------------------------------
async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until the socket takes bytes again (or has failed: the next send says how)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


@contextlib.asynccontextmanager
async def _progress_within(seconds: float) -> AsyncIterator[None]:
    """Raise Stalled when the block takes longer than ``seconds`` (http.write_timeout)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise Stalled(f"the client took nothing for {seconds:.0f}s") from None


async def _sendfile(
    request: web.Request, sock_fd: int, file_fd: int, offset: int, count: int, sent: _Sent
) -> None:
    """Copy ``count`` bytes at ``offset`` to the socket."""
    loop = asyncio.get_running_loop()
    timeout = http_limits(request.app).write_timeout
    out = os.dup(sock_fd)  # the loop watches the transport's own descriptor; we watch a twin
    try:
        warm_until = offset
        while count > 0:
            if offset >= warm_until:
                window = min(WINDOW, count)
                await _warm(loop, file_fd, offset, window)
                warm_until = offset + window
            turn = 0
            try:
                while count > 0 and offset < warm_until and turn < TURN:
                    n = os.sendfile(out, file_fd, offset, min(count, warm_until - offset))
                    if n == 0:
                        raise _ShortFile("blob file is shorter than its recorded size")
                    offset += n
                    count -= n
                    sent.n += n
                    turn += n
            except BlockingIOError:
                async with _progress_within(timeout):
                    await _writable(loop, out)
                continue
            if turn >= TURN:
                await asyncio.sleep(0)  # let the other connections have the loop
    finally:
        os.close(out)


async def write_with_deadline(
    request: web.Request, resp: web.StreamResponse, data: bytes | bytearray
) -> None:
    """``resp.write`` (which waits while the transport's buffer is full), bounded by
    ``http.write_timeout``: a client that takes nothing for that long raises Stalled."""
    async with _progress_within(http_limits(request.app).write_timeout):
        await resp.write(data)


# --- responses -------------------------------------------------------------------------------------
def _open(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


async def open_file(path: Path) -> int:
    """A read-only descriptor of ``path``: opened on the loop when its path is all in the
    kernel's caches, else on a worker thread (which waits for the disk)."""
    fd = open_cached(path)
    if fd is None:
        fd = await asyncio.get_running_loop().run_in_executor(None, _open, path)
    return fd


async def send_file(
    request: web.Request,
    digest: Digest,
    size: int,
    path: Path,
    headers: dict[str, str],
    rng: tuple[int, int] | None,
) -> web.StreamResponse:
    """A committed blob file: status and headers through aiohttp, the body as described above."""
    start, end = rng if rng is not None else (0, size - 1)
    count = end - start + 1
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    status = 200 if rng is None else 206
    if request.method == "HEAD" or count <= 0:
        headers["Content-Length"] = str(max(count, 0))
        return web.Response(status=status, headers=headers)
    try:
        file_fd = await open_file(path)
    except FileNotFoundError:
        raise BlobUnknown(str(digest)) from None
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = count
    sent = _Sent()
    try:
        await resp.prepare(request)
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("ssl_object") is not None:
            await _send_chunks(request, resp, file_fd, start, count, sent)
        else:
            # the headers must be on the wire before the body goes around the transport
            await write_with_deadline(request, resp, b"")
            await _flushed(request, transport)
            await _sendfile(request, sock.fileno(), file_fd, start, count, sent)
    except (*CLIENT_GONE, Stalled, _ShortFile) as exc:
        note_cut(request, digest, exc)
        if request.transport is not None:
            request.transport.abort()  # never leave a response with missing bytes
        return resp
    finally:
        os.close(file_fd)
        note_body(request, sent.n)
        app_metrics(request.app).served("blob", "disk", sent.n)
    await resp.write_eof()
    return resp


async def send_spans(
    request: web.Request,
    resp: web.StreamResponse,
    spans: AsyncIterator[tuple[int, int, int]],
    counted: Callable[[int], None],
) -> None:
    """The body of a prepared response from a file still being written (a transfer in flight):
    each span ``(fd, pos, stop)`` goes out like a committed file's bytes (sendfile; over TLS
    pread and the transport) before the next one is asked for; ``counted(n)`` after each.
    Raises one of :data:`SEND_ERRORS` when the client goes or stalls."""
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("connection lost")
    sock = transport.get_extra_info("socket")
    direct = sock is not None and transport.get_extra_info("ssl_object") is None
    flushed = False
    sent = _Sent()
    async for fd, pos, stop in spans:
        before = sent.n
        try:
            if not direct:
                await _send_chunks(request, resp, fd, pos, stop - pos, sent)
                continue
            if not flushed:  # the headers must be on the wire before the body goes around
                await write_with_deadline(request, resp, b"")
                await _flushed(request, transport)
                flushed = True
            await _sendfile(request, sock.fileno(), fd, pos, stop - pos, sent)
        finally:
            counted(sent.n - before)


async def _flushed(request: web.Request, transport: asyncio.Transport) -> None:
    """Wait until the transport has handed every byte it holds to the kernel."""
    if not transport.get_write_buffer_size():
        return
    sock = transport.get_extra_info("socket")
    out = os.dup(sock.fileno())
    try:
        loop = asyncio.get_running_loop()
        async with _progress_within(http_limits(request.app).write_timeout):
            while transport.get_write_buffer_size():
                if transport.is_closing():
                    raise ConnectionResetError("connection lost")
                # the socket turns writable when the kernel has room: the transport's own
                # writer runs on that same wake-up, so its buffer shrinks by the next check
                await _writable(loop, out)
                await asyncio.sleep(0)
    finally:
        os.close(out)


async def _send_chunks(
    request: web.Request,
    resp: web.StreamResponse,
    file_fd: int,
    offset: int,
    count: int,
    sent: _Sent,
) -> None:
    """TLS (or no socket to hand): the bytes go through the transport, a chunk at a time (256
    KiB: a chunk waits in the TLS layer twice, as plain and encrypted bytes, so a bigger one
    costs every slow TLS reader that much more memory). One timer for the whole body, moved on
    after every chunk the client took (``http.write_timeout`` per write, as
    :func:`write_with_deadline`; the disk read is not timed)."""
    loop = asyncio.get_running_loop()
    timeout = http_limits(request.app).write_timeout
    try:
        async with asyncio.timeout(None) as timer:
            while count > 0:
                chunk = await _read(loop, file_fd, offset, min(BLOB_CHUNK, count))
                if not chunk:
                    raise _ShortFile("blob file is shorter than its recorded size")
                timer.reschedule(loop.time() + timeout)
                await resp.write(chunk)
                timer.reschedule(None)
                offset += len(chunk)
                count -= len(chunk)
                sent.n += len(chunk)
    except TimeoutError:
        raise Stalled(f"the client took nothing for {timeout:.0f}s") from None
