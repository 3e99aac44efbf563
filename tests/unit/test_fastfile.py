"""A blob file's body as the fast lane streams it (regproxy.fastfile over TLS, regproxy.fastsend
with sendfile), against a fake connection over a real file: the head and then the bytes whole and in order, no write while the transport
says stop, a client that takes nothing cut after ``http.write_timeout``, a file shorter than its
record cut, a chunk not in the page cache read on a worker, the descriptor closed once."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy import fastfile, fastsend
from regproxy.fastfile import FileBody
from regproxy.fastsend import SendfileBody
from regproxy.units import BLOB_CHUNK

HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: n\r\n\r\n"


class Transport:
    """Takes ``room`` bytes, then asks its writer to stop (as a full socket would)."""

    def __init__(self, out: Out, room: int) -> None:
        self.out = out
        self.room = room
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))
        self.room -= len(data)
        if self.room <= 0:
            self.out.paused = True

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.write(b"".join(parts))

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


class Out:
    def __init__(self, room: int = 1 << 40) -> None:
        self.paused = False
        self.transport: Transport | None = Transport(self, room)
        self.woken = asyncio.Event()

    def wake(self) -> None:
        self.woken.set()


class Ends:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None, BaseException | None]] = []

    def __call__(self, sent: int, error: str | None, fault: BaseException | None) -> None:
        self.calls.append((sent, error, fault))


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(4 * BLOB_CHUNK + 777)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    try:
        os.close(fd)
    except OSError:
        pass  # the body closed it, as it must


async def pump(body: FileBody, out: Out) -> bool:
    """Pump until the body is over or waits for the client (not for a read on a worker: the
    page-cache probe says no on a filesystem without ``RWF_NOWAIT``, as tmpfs)."""
    for _ in range(100):
        if body.pump(out):
            return True
        if not body.ending.reading:
            return False
        await asyncio.wait_for(out.woken.wait(), 30)  # a bound on the test, not a figure
        out.woken.clear()
    raise AssertionError("the body never settled")


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


async def test_the_head_then_the_bytes_with_no_write_while_paused(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    out, ends = Out(room=BLOB_CHUNK + 10), Ends()
    body = FileBody(HEAD, fd, len(data), 60.0, ends)
    assert not await pump(body, out)  # the first chunk filled the transport
    assert out.transport is not None and len(out.transport.written) == 1
    assert not await pump(body, out) and len(out.transport.written) == 1  # still paused
    out.paused = False
    out.transport.room = 1 << 40
    assert await pump(body, out)
    sent = b"".join(out.transport.written)
    assert sent == HEAD + data
    assert max(len(w) for w in out.transport.written[1:]) <= BLOB_CHUNK
    assert ends.calls == [(len(data), None, None)] and closed(fd)
    body.ending.lost()  # after its end: nothing more
    assert len(ends.calls) == 1


async def test_a_client_that_takes_nothing_is_cut_after_write_timeout(
    blob: tuple[int, bytes],
) -> None:
    fd, data = blob
    out, ends = Out(room=1), Ends()
    body = FileBody(HEAD, fd, len(data), 0.05, ends)
    assert not await pump(body, out)
    out.woken.clear()
    await asyncio.wait_for(out.woken.wait(), 30)  # a bound on the test, not the figure
    assert out.transport is not None and out.transport.aborted
    assert ends.calls == [(BLOB_CHUNK, "client_stalled", None)] and closed(fd)
    assert body.pump(out)


async def test_a_file_shorter_than_its_record_is_cut(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    out, ends = Out(), Ends()
    assert await pump(FileBody(HEAD, fd, len(data) + 5, 60.0, ends), out)
    assert out.transport is not None and out.transport.aborted
    ((sent, error, fault),) = ends.calls
    assert sent == len(data) and error == "aborted" and isinstance(fault, EOFError)
    assert b"".join(out.transport.written) == HEAD + data and closed(fd)


async def test_a_client_gone_ends_it_once(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    out, ends = Out(room=1), Ends()
    body = FileBody(HEAD, fd, len(data), 60.0, ends)
    assert not await pump(body, out)
    body.ending.lost()
    body.ending.lost()
    assert ends.calls == [(BLOB_CHUNK, "client_gone", None)] and closed(fd)


async def test_chunks_not_in_the_page_cache_are_read_on_a_worker(
    blob: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = blob
    monkeypatch.setattr(fastfile, "readable_now", lambda fd, offset, count: False)
    out, ends = Out(), Ends()
    body = FileBody(HEAD, fd, len(data), 60.0, ends)
    for _ in range(20):  # five chunks, each read on a worker, then pumped on
        if body.pump(out):
            break
        await asyncio.wait_for(out.woken.wait(), 30)
        out.woken.clear()
    assert out.transport is not None
    assert b"".join(out.transport.written) == HEAD + data
    assert ends.calls == [(len(data), None, None)] and closed(fd)


async def test_gone_while_a_worker_reads_closes_the_file_when_the_read_is_back(
    blob: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    fd, data = blob
    monkeypatch.setattr(fastfile, "readable_now", lambda fd, offset, count: False)
    out, ends = Out(), Ends()
    body = FileBody(HEAD, fd, len(data), 60.0, ends)
    assert not body.pump(out)
    body.ending.lost()
    assert ends.calls == [(0, "client_gone", None)]
    assert not closed(fd)  # the worker still reads it: not yet (its number must not be reused)
    for _ in range(500):  # a bound on the test, not a figure
        if closed(fd):
            break
        await asyncio.sleep(0.01)
    assert closed(fd) and out.transport is not None and out.transport.written == []


class SocketTransport:
    """A transport as :class:`SendfileBody` sees it: the socket to send around it, nothing
    buffered in it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.aborted = False

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


async def drive(body: SendfileBody, out: Out, reader: socket.socket, want: int) -> bytes:
    """Pump the body while reading the other end, as a client would, until ``want`` bytes."""
    loop = asyncio.get_running_loop()
    got = b""
    over = body.pump(out)
    for _ in range(10_000):  # a bound on the test, not a figure
        if len(got) >= want:
            break
        try:
            got += reader.recv(1 << 20)
        except BlockingIOError:
            await asyncio.sleep(0.001)
        if not over and out.woken.is_set():
            out.woken.clear()
            over = body.pump(out)
    await asyncio.sleep(0)
    if not over:
        over = body.pump(out)
    assert over and loop.is_running()
    return got


@pytest.mark.parametrize("cached", [True, False])
async def test_sendfile_sends_the_head_then_the_file_whole(
    blob: tuple[int, bytes], monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    """Plain HTTP: the head then the bytes in order, through a socket that fills (EAGAIN, then
    writable again); windows not in the page cache read in on a worker first."""
    fd, data = blob
    monkeypatch.setattr(fastsend, "in_page_cache", lambda fd, offset, count: cached)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    try:
        out, ends = Out(), Ends()
        out.transport = SocketTransport(a)  # type: ignore[assignment]
        body = SendfileBody(HEAD, fd, len(data), 60.0, ends)
        got = await drive(body, out, b, len(HEAD) + len(data))
        assert got == HEAD + data
        assert ends.calls == [(len(data), None, None)] and closed(fd)
    finally:
        a.close()
        b.close()


async def test_sendfile_of_a_file_shorter_than_its_record_is_cut(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        out, ends = Out(), Ends()
        transport = SocketTransport(a)
        out.transport = transport  # type: ignore[assignment]
        body = SendfileBody(HEAD, fd, len(data) + 5, 60.0, ends)
        got = await drive(body, out, b, len(HEAD) + len(data))
        assert got == HEAD + data and transport.aborted
        ((sent, error, fault),) = ends.calls
        assert sent == len(data) and error == "aborted" and isinstance(fault, EOFError)
        assert closed(fd)
    finally:
        a.close()
        b.close()
