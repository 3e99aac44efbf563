"""The connection guard's framing for the fast lane (regproxy.connections), on a fake transport,
a fake lane and a fake aiohttp protocol, with the guard's clock in the test's hands: which
request goes where, in which order, and when the lane takes a connection back."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from aiohttp.base_protocol import BaseProtocol

from regproxy.config import HttpConfig
from regproxy.connections import ConnectionGuard
from regproxy.fastfile import FileBody
from regproxy.metrics import Metrics
from regproxy.units import BLOB_CHUNK


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None


class Inner(BaseProtocol):
    """aiohttp's protocol, as far as the guard sees it: what it was handed, and its flow
    control (aiohttp's own: a second pause, or a resume while not paused, is an assertion)."""

    def __init__(self) -> None:
        super().__init__(asyncio.get_running_loop())
        self.got = b""

    def data_received(self, data: bytes) -> None:
        self.got += data


class Lane:
    """Answers ``GET /fast...`` (``/fastclose`` with Connection: close), declines the rest."""

    def answer(
        self, head: bytes, remote: str | None, followed: bool, files: str = ""
    ) -> tuple[bytes, bool] | None:
        target = head.split(b" ")[1]
        if not target.startswith(b"/fast"):
            return None
        return b"ANSWER " + target + b"\n", target == b"/fastclose"


def req(target: str, *extra: str, method: str = "GET") -> bytes:
    return "\r\n".join([f"{method} {target} HTTP/1.1", "Host: x", *extra, "", ""]).encode()


class Conn:
    def __init__(self, keepalive: float = 10.0) -> None:
        self.now = 1000.0
        self.inner = Inner()
        guard = ConnectionGuard(
            lambda: self.inner,
            HttpConfig(keepalive_timeout=keepalive),
            10,
            Metrics(),
            Lane(),
            clock=lambda: self.now,
        )
        self.proto: Any = guard()
        self.transport = Transport()
        self.proto.connection_made(self.transport)

    def send(self, data: bytes) -> None:
        self.proto.data_received(data)

    def answered(self) -> list[bytes]:
        out, self.transport.written = self.transport.written, []
        return out

    def done(self, keep_alive: bool = True) -> None:
        """aiohttp finished a response (its access logger tells the guard)."""
        self.proto.inner_done(keep_alive)

    def lost(self) -> None:
        self.proto.connection_lost(None)


async def test_pipelined_requests_keep_their_order_and_the_lane_takes_over_again() -> None:
    c = Conn()
    try:
        c.send(req("/fast1") + req("/slow") + req("/fast2") + req("/fast3"))
        # the lane answers the first; aiohttp the second, and those behind it until it is done
        assert c.answered() == [b"ANSWER /fast1\n"]
        assert c.inner.got == req("/slow") + req("/fast2") + req("/fast3")
        c.done()
        c.done()
        c.send(req("/fast4"))  # one still out: behind it
        assert c.answered() == [] and c.inner.got.endswith(req("/fast3") + req("/fast4"))
        c.done()
        c.done()
        c.send(req("/fast5"))
        assert c.answered() == [b"ANSWER /fast5\n"]
    finally:
        c.lost()


async def test_a_request_with_a_body_gives_the_connection_to_aiohttp_for_good() -> None:
    c = Conn()
    try:
        upload = req("/v2/x/blobs/uploads/1", "Content-Length: 4", method="PUT") + b"abcd"
        c.send(req("/fast1") + upload + req("/fast2"))
        assert c.answered() == [b"ANSWER /fast1\n"]
        assert c.inner.got == upload + req("/fast2")
        c.done()
        c.done()
        c.send(req("/fast3"))
        assert c.answered() == [] and c.inner.got.endswith(req("/fast3"))
    finally:
        c.lost()


async def test_a_head_in_pieces_and_odd_framing() -> None:
    c = Conn()
    try:
        whole = req("/fast1")
        for i in range(0, len(whole), 3):
            c.send(whole[i : i + 3])
        assert c.answered() == [b"ANSWER /fast1\n"] and c.inner.got == b""
        c.send(b"GET /fast2 HTTP/1.1\nHost: x\n\n")  # bare LF: aiohttp's to refuse
        assert c.answered() == [] and c.inner.got == b"GET /fast2 HTTP/1.1\nHost: x\n\n"
    finally:
        c.lost()
    c = Conn()
    try:
        c.send(b"PO")  # not the start of a GET or HEAD: aiohttp's at once
        assert c.inner.got == b"PO"
    finally:
        c.lost()


async def test_connection_close_closes_and_a_closing_answer_from_aiohttp_ends_the_lane() -> None:
    c = Conn()
    try:
        c.send(req("/fastclose"))
        assert c.answered() == [b"ANSWER /fastclose\n"] and c.transport.closed
    finally:
        c.lost()
    c = Conn()
    try:
        c.send(req("/slow"))
        c.done(keep_alive=False)  # aiohttp closes after it: nothing more is answered here
        c.send(req("/fast1"))
        assert c.answered() == [] and c.inner.got == req("/slow") + req("/fast1")
    finally:
        c.lost()


async def test_aiohttp_gets_a_request_every_half_keepalive_so_it_never_closes_a_busy_one() -> None:
    c = Conn(keepalive=10.0)
    try:
        c.send(req("/slow"))
        c.done()  # aiohttp's keep-alive clock starts now
        c.now += 4.9
        c.send(req("/fast1"))
        assert c.answered() == [b"ANSWER /fast1\n"]
        c.now += 0.2  # past half the timeout since aiohttp's last answer
        c.send(req("/fast2"))
        assert c.answered() == [] and c.inner.got.endswith(req("/fast2"))
        c.done()  # which restarts its clock
        c.send(req("/fast3"))
        assert c.answered() == [b"ANSWER /fast3\n"]
    finally:
        c.lost()


async def test_no_answer_while_the_transport_asks_to_stop_writing() -> None:
    c = Conn()
    try:
        c.proto.pause_writing()
        c.send(req("/fast1"))
        assert c.answered() == [] and c.inner.got == req("/fast1")
        c.proto.resume_writing()
        c.done()
        c.send(req("/fast2"))
        assert c.answered() == [b"ANSWER /fast2\n"]
    finally:
        c.lost()


async def test_aiohttp_hears_a_pause_once_and_a_resume_only_when_paused() -> None:
    # a transport that says pause (or resume) twice in a row: aiohttp's protocol asserts on a
    # second one, which the loop logged as an error (seen under a fault); it hears each turn once
    c = Conn()
    try:
        c.proto.pause_writing()
        c.proto.pause_writing()
        assert c.inner.writing_paused and c.proto.paused
        c.proto.resume_writing()
        c.proto.resume_writing()
        assert not c.inner.writing_paused and not c.proto.paused
        c.proto.resume_writing()  # a resume with no pause before it
        c.proto.pause_writing()
        assert c.inner.writing_paused
        c.proto.resume_writing()
        assert not c.inner.writing_paused
        c.send(req("/fast1"))  # and the lane answers again
        assert c.answered() == [b"ANSWER /fast1\n"]
    finally:
        c.lost()


class TLSTransport(Transport):
    """A TLS transport whose client takes nothing: what is written waits, and past ``room``
    bytes it asks its protocol to stop writing (as asyncio's does at its high-water mark)."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room
        self.waiting = 0
        self.protocol: Any = None

    def write(self, data: bytes) -> None:
        was = self.waiting
        self.waiting += len(data)
        if was <= self.room < self.waiting:
            self.protocol.pause_writing()

    def writelines(self, parts: tuple[bytes, ...]) -> None:
        self.write(b"".join(parts))

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def get_extra_info(self, name: str) -> Any:
        return object() if name == "ssl_object" else super().get_extra_info(name)


async def test_a_stalled_client_of_a_lane_body_is_cut_once_as_stalled(tmp_path: Path) -> None:
    """A client that takes nothing of a blob body the lane streams over TLS: the body's own
    stall timer cuts it (``client_stalled``), and the guard's write watch, which looks at the
    same bytes waiting, leaves it alone: it cut it first now and then, and the body ended as
    ``client_gone`` (one stalled client reported both ways, by one or the other)."""
    write_timeout = 0.2
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(8 * BLOB_CHUNK))
    ends: list[str | None] = []
    ended = asyncio.Event()

    def finish(sent: int, error: str | None, fault: BaseException | None) -> None:
        ends.append(error)
        ended.set()

    class BlobLane:
        def answer(
            self, head: bytes, remote: str | None, followed: bool, files: str = ""
        ) -> tuple[FileBody, bool]:
            assert files == "tls"
            fd = os.open(path, os.O_RDONLY)
            body = FileBody(b"HTTP/1.1 200 OK\r\n\r\n", fd, 8 * BLOB_CHUNK, write_timeout, finish)
            return body, False

    now = 1000.0
    metrics = Metrics()
    guard = ConnectionGuard(
        Inner, HttpConfig(write_timeout=write_timeout), 10, metrics, BlobLane(), lambda: now
    )
    proto: Any = guard()
    transport = TLSTransport(room=BLOB_CHUNK)
    transport.protocol = proto
    proto.connection_made(transport)
    try:
        proto.data_received(req("/v2/x/blobs/sha256:" + "a" * 64))
        for _ in range(500):  # bounded: a read on a worker first, where the probe says so
            if proto.paused:
                break
            await asyncio.sleep(0.01)
        assert proto.paused and proto.body is not None  # the body waits for the client
        assert guard.writes.sweep() == 0  # the watch sees the bytes waiting: its clock starts
        now += 10 * write_timeout  # and nothing taken since, for longer than write_timeout
        assert guard.writes.sweep() == 0 and not transport.closed
        async with asyncio.timeout(5):  # a bound on the test: the body's timer fires
            await ended.wait()
        assert transport.closed  # aborted by the body
    finally:
        proto.connection_lost(None)  # (the loop's, after the abort)
    assert ends == ["client_stalled"]
    assert metrics.slow_clients_cut.labels("write")._value.get() == 0  # the lane's finish counts it
