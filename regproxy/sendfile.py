"""Blob files to clients with sendfile(2), off the event loop (the HTTP side of serving a file).

uvloop has no ``loop.sendfile``, so aiohttp's ``FileResponse`` falls back to reading the file in
chunks through the executor and writing them from Python. Here a response costs one executor hop
to open the file and one to send it. Over TLS the bytes must go through the TLS transport, so
they are read with ``pread`` off the loop instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from aiohttp import web

from regproxy.errors import BlobUnknown
from regproxy.oci import Digest

log = logging.getLogger("regproxy.api")
CHUNK: Final = 256 * 1024
SENDFILE_THREADS: Final = 64  # one per blob being sent; the threads sleep in poll(2)
SENDFILE_STALL_SECONDS: Final = 60.0  # a client that takes nothing for this long is cut off


class _Sender:
    """Blob bodies with sendfile(2), off the event loop.

    uvloop has no ``loop.sendfile``, so aiohttp's ``FileResponse`` falls back to reading the file
    in 256 KiB chunks through the executor and writing them from Python (plus two executor hops
    for stat and open). Here each response costs one hop to open the file and one to send it: a
    worker thread calls ``sendfile`` on a dup of the connection's socket until the range is sent,
    waiting in ``poll`` while the socket buffer is full. No bytes pass through Python.
    """

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(SENDFILE_THREADS, thread_name_prefix="regproxy-sendfile")
        self.stopping = threading.Event()

    def close(self) -> None:
        self.stopping.set()
        self.pool.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def open(path: Path) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def send(self, sock_fd: int, file_fd: int, offset: int, count: int) -> None:
        """Blocking: copy ``count`` bytes at ``offset``; closes both descriptors."""
        try:
            poller = select.poll()
            poller.register(sock_fd, select.POLLOUT)
            idle = 0.0
            while count > 0:
                try:
                    n = os.sendfile(sock_fd, file_fd, offset, count)
                except BlockingIOError:
                    if self.stopping.is_set() or idle >= SENDFILE_STALL_SECONDS:
                        raise TimeoutError("client stopped reading") from None
                    if not poller.poll(1000):
                        idle += 1.0
                    continue
                if n == 0:
                    raise EOFError("blob file is shorter than its recorded size")
                offset += n
                count -= n
                idle = 0.0
        finally:
            os.close(sock_fd)
            os.close(file_fd)


SENDER_KEY: Final = web.AppKey("sender", _Sender)


async def _close_sender(app: web.Application) -> None:
    await asyncio.get_running_loop().run_in_executor(None, app[SENDER_KEY].close)


def setup(app: web.Application) -> None:
    app[SENDER_KEY] = _Sender()
    app.on_cleanup.append(_close_sender)


async def send_file(
    request: web.Request,
    digest: Digest,
    size: int,
    path: Path,
    headers: dict[str, str],
    rng: tuple[int, int] | None,
) -> web.StreamResponse:
    """A committed blob file: headers through aiohttp, the body with sendfile (see _Sender)."""
    start, end = rng if rng is not None else (0, size - 1)
    count = end - start + 1
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    status = 200 if rng is None else 206
    if request.method == "HEAD" or count <= 0:
        headers["Content-Length"] = str(max(count, 0))
        return web.Response(status=status, headers=headers)
    sender = request.app[SENDER_KEY]
    loop = asyncio.get_running_loop()
    try:
        file_fd = await loop.run_in_executor(sender.pool, sender.open, path)
    except FileNotFoundError:
        raise BlobUnknown(str(digest)) from None
    if request.transport is not None and request.transport.get_extra_info("ssl_object"):
        return await _send_file_tls(request, digest, file_fd, status, headers, start, count)
    try:
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = count
        writer = await resp.prepare(request)
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None or writer is None:
            raise ConnectionResetError("connection lost")
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:  # aiohttp >= 3.10 holds headers back until the body
            send_headers()
        for _ in range(int(SENDFILE_STALL_SECONDS * 100)):
            if transport.is_closing():
                raise ConnectionResetError("connection lost")
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.01)
        else:
            raise TimeoutError("client stopped reading")
        sock_fd = os.dup(sock.fileno())
    except BaseException:
        os.close(file_fd)
        raise
    future = sender.pool.submit(sender.send, sock_fd, file_fd, start, count)
    try:
        await asyncio.wrap_future(future)
    except BaseException as exc:
        if future.cancel():  # never started: the descriptors are still ours
            os.close(sock_fd)
            os.close(file_fd)
        if not isinstance(exc, asyncio.CancelledError):
            _note_aborted(request, digest, exc)
        transport.abort()  # never leave a response with missing bytes on a kept-alive connection
        if isinstance(exc, asyncio.CancelledError):
            raise
        return resp
    await resp.write_eof()
    return resp


async def _send_file_tls(
    request: web.Request,
    digest: Digest,
    file_fd: int,
    status: int,
    headers: dict[str, str],
    offset: int,
    count: int,
) -> web.StreamResponse:
    """TLS: sendfile(2) on the socket would bypass the TLS layer, so the bytes go through the
    transport, read with ``pread`` off the loop. Closes ``file_fd``."""
    loop = asyncio.get_running_loop()
    pool = request.app[SENDER_KEY].pool
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = count
    try:
        await resp.prepare(request)
        while count > 0:
            chunk = await loop.run_in_executor(pool, os.pread, file_fd, min(CHUNK, count), offset)
            if not chunk:
                raise EOFError("blob file is shorter than its recorded size")
            await resp.write(chunk)
            offset += len(chunk)
            count -= len(chunk)
    except EOFError as exc:
        _note_aborted(request, digest, exc)
        if request.transport is not None:
            request.transport.abort()  # never end a response with missing bytes
        return resp
    finally:
        os.close(file_fd)
    await resp.write_eof()
    return resp


def _note_aborted(request: web.Request, digest: Digest, exc: BaseException) -> None:
    """Log a blob response cut short and mark it in the access notes."""
    log.warning(
        "blob.aborted digest=%s repo=%s error=%r",
        digest,
        (request.get("notes") or {}).get("repo"),
        exc,
    )
    request.setdefault("notes", {})["error"] = "aborted"
