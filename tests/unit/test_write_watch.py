"""regproxy.write_watch: a connection whose client takes none of the bytes waiting for it is
cut after ``http.write_timeout``; one that takes some, however few, is not."""

from __future__ import annotations

import asyncio

from regproxy.write_watch import WriteWatch


class FakeTransport:
    def __init__(self) -> None:
        self.waiting = 0
        self.acked = 0
        self.aborted = False

    def get_write_buffer_size(self) -> int:
        return self.waiting

    def abort(self) -> None:
        self.aborted = True


class Conn:
    def __init__(self) -> None:
        self.transport: FakeTransport | None = FakeTransport()
        self.stalled_since: float | None = None
        self.stalled_mark = (0, 0)

    def peer(self) -> object:
        return ("127.0.0.1", 1)


class Setup:
    def __init__(self, timeout: float = 10.0) -> None:
        self.now = 0.0
        self.cuts = 0
        self.watch = WriteWatch(
            timeout,
            lambda: self.now,
            self.on_cut,
            progress=lambda t: t.acked,  # type: ignore[attr-defined]
        )

    def on_cut(self) -> None:
        self.cuts += 1

    def at(self, now: float) -> int:
        self.now = now
        return self.watch.sweep()


async def watched(setup: Setup) -> tuple[Conn, FakeTransport]:
    conn = Conn()
    setup.watch.add(conn)  # type: ignore[arg-type]
    assert conn.transport is not None
    return conn, conn.transport


async def test_bytes_nobody_takes_are_cut_after_the_timeout_once() -> None:
    s = Setup(timeout=10)
    conn, t = await watched(s)
    t.waiting = 3_000_000
    assert s.at(1) == 0  # first seen waiting: the clock starts
    assert s.at(10.9) == 0
    assert s.at(11) == 1 and t.aborted and s.cuts == 1
    assert conn not in s.watch.live
    assert s.at(30) == 0 and s.cuts == 1  # cut once
    s.watch.close()


async def test_a_slow_reader_that_takes_some_bytes_is_never_cut() -> None:
    s = Setup(timeout=10)
    _, t = await watched(s)
    t.waiting = 3_000_000
    for step in range(1, 40):
        t.waiting -= 1000  # a few bytes per look: progress
        assert s.at(step * 5.0) == 0
    assert not t.aborted
    s.watch.close()


async def test_bytes_acknowledged_by_the_client_count_as_progress() -> None:
    """A buffer refilled as fast as it drains (the lane answering pipelined requests) does
    not shrink, but the kernel sees the client's acknowledgements."""
    s = Setup(timeout=10)
    _, t = await watched(s)
    t.waiting = 100_000
    for step in range(1, 40):
        t.acked += 65536
        assert s.at(step * 5.0) == 0
    t.waiting += 5000  # more written, nothing taken: the clock runs from the last progress (195)
    assert s.at(200) == 0
    assert s.at(204) == 0
    assert s.at(205) == 1 and t.aborted
    s.watch.close()


async def test_an_empty_buffer_stops_the_clock() -> None:
    s = Setup(timeout=10)
    _, t = await watched(s)
    t.waiting = 500
    assert s.at(1) == 0
    t.waiting = 0
    assert s.at(9) == 0
    t.waiting = 500  # a new answer waiting: a new clock
    assert s.at(12) == 0
    assert s.at(21) == 0
    assert s.at(22) == 1
    s.watch.close()


async def test_a_gone_connection_is_not_looked_at_and_the_timer_stops() -> None:
    s = Setup(timeout=0.2)
    conn, t = await watched(s)
    t.waiting = 10
    s.watch.discard(conn)  # type: ignore[arg-type]
    assert s.at(100) == 0 and not t.aborted
    await asyncio.sleep(s.watch.interval * 2)  # the tick finds nothing live and stops
    assert s.watch._timer is None
