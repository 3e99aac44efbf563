"""The pump (regproxy.pump): a body from a socket into the store, hashed beside it, on a clock
the test moves. The socket is a fake that hands out prepared pieces."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from regproxy.deadline import Pace, TransferLimits
from regproxy.errors import UpstreamTooSlow
from regproxy.oci import Digest
from regproxy.pump import BUFFERS, CHUNK, MOST_BUFFERS, Stopped, pump
from regproxy.store import BlobWriter, Store

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeBody:
    """``pieces``: bytes to hand out (split to fit the buffer), or None for a receive slice that
    passes without a byte (it moves the clock by ``tick``); then the peer closes."""

    def __init__(
        self, head: bytes, pieces: list[bytes | None], left: int, clock: Clock, tick: float = 1.0
    ) -> None:
        self.head = head
        self.left = left
        self.read_timeout = 3600.0
        self.clock = clock
        self.tick = tick
        self.pieces = list(pieces)
        self.interrupted = False

    def receive_into(self, buffer: memoryview) -> int:
        if not self.pieces:
            return 0
        piece = self.pieces.pop(0)
        if piece is None:
            self.clock.now += self.tick
            raise BlockingIOError
        n = min(len(piece), len(buffer))
        buffer[:n] = piece[:n]
        if n < len(piece):
            self.pieces.insert(0, piece[n:])
        return n

    def interrupt(self) -> None:
        self.interrupted = True

    def guard(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[BlobWriter]:
    store = Store(tmp_path / "store")
    store.open()
    w = store.writer()
    yield w
    w.abort()


@pytest.fixture
def hashing() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1)
    yield pool
    pool.shutdown(wait=True)


def run(body: FakeBody, writer: BlobWriter, hashing: ThreadPoolExecutor, pace: Pace) -> list[int]:
    landed: list[int] = []
    pump(
        body,
        writer,
        source="fake",
        pace=pace,
        landed=landed.append,
        stop=threading.Event(),
        hashing=hashing,
        spare=threading.Semaphore(MOST_BUFFERS),
    )
    return landed


def lenient(clock: Clock) -> Pace:
    return Pace(TransferLimits(min_rate=0, window=60, max_time=1e9), clock, clock() + 1e9)


def test_head_and_body_land_in_order_written_and_hashed(
    writer: BlobWriter, hashing: ThreadPoolExecutor
) -> None:
    clock = Clock()
    head = os.urandom(3 * MiB + 5)  # what the HTTP client had read already: more than a chunk
    rest = os.urandom(5 * CHUNK + 123)
    # uneven pieces, and slices without a byte between them
    pieces: list[bytes | None] = [rest[:1000], None, rest[1000 : 3 * MiB], None, rest[3 * MiB :]]
    landed = run(FakeBody(head, pieces, len(rest), clock), writer, hashing, lenient(clock))
    assert sum(landed) == len(head) + len(rest) and landed[0] == len(head)
    data = head + rest
    assert writer.path.read_bytes() == data
    assert writer.digest() == Digest("sha256", hashlib.sha256(data).hexdigest())


def test_a_body_that_ends_early_is_a_cut_and_leaves_no_hash_running(
    writer: BlobWriter, hashing: ThreadPoolExecutor
) -> None:
    clock = Clock()
    rest = os.urandom(2 * CHUNK)
    body = FakeBody(b"", [rest], len(rest) + 10, clock)
    with pytest.raises(ConnectionResetError):
        run(body, writer, hashing, lenient(clock))
    # the hashing thread is done with the writer: the next job runs at once on the one thread
    assert hashing.submit(lambda: 1).result(timeout=5) == 1
    assert writer.path.stat().st_size == len(rest)


def test_a_source_below_its_rate_is_too_slow_on_the_clock(
    writer: BlobWriter, hashing: ThreadPoolExecutor
) -> None:
    clock = Clock()
    pace = Pace(TransferLimits(min_rate=1024, window=10, max_time=3600), clock, clock() + 3600)
    # 100 bytes, then silence: one slice moves the clock a second
    body = FakeBody(b"", [b"x" * 100, *([None] * 30)], 10 * MiB, clock)
    with pytest.raises(UpstreamTooSlow):
        run(body, writer, hashing, pace)
    assert 10 <= clock.now - 100.0 <= 12  # dropped once the window showed the shortfall


def test_silence_longer_than_the_read_timeout_is_a_timeout(
    writer: BlobWriter, hashing: ThreadPoolExecutor
) -> None:
    clock = Clock()
    body = FakeBody(b"", [None] * 1000, MiB, clock, tick=0)
    body.read_timeout = 0.0  # wall-clock: the first empty slice is already too long
    with pytest.raises(TimeoutError):
        run(body, writer, hashing, lenient(clock))


def test_a_stop_request_ends_the_pump(writer: BlobWriter, hashing: ThreadPoolExecutor) -> None:
    clock = Clock()
    stop = threading.Event()
    stop.set()
    body = FakeBody(b"", [os.urandom(CHUNK)], 4 * CHUNK, clock)
    with pytest.raises(Stopped):
        pump(
            body,
            writer,
            source="fake",
            pace=lenient(clock),
            landed=lambda n: None,
            stop=stop,
            hashing=hashing,
            spare=threading.Semaphore(0),
        )


class GatedBody(FakeBody):
    """Counts the buffers it is handed; opens ``gate`` (which holds the hashing thread) at the
    ``open_at``-th receive, so until then every buffer the pump has waits for its hash."""

    def __init__(self, data: bytes, clock: Clock, gate: threading.Event, open_at: int) -> None:
        super().__init__(b"", [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)], 0, clock)
        self.left = len(data)
        self.gate, self.open_at = gate, open_at
        self.buffers: set[int] = set()
        self.calls = 0

    def receive_into(self, buffer: memoryview) -> int:
        self.calls += 1
        self.buffers.add(id(buffer.obj))
        if self.calls == self.open_at:
            self.gate.set()
        return super().receive_into(buffer)


@pytest.mark.parametrize(("allowance", "cut"), [(0, False), (MOST_BUFFERS, False), (0, True)])
def test_a_lagging_hash_gets_more_buffers_within_the_shared_allowance(
    writer: BlobWriter, hashing: ThreadPoolExecutor, allowance: int, cut: bool
) -> None:
    """While every buffer waits for its hash the pump takes one more, up to MOST_BUFFERS and
    as far as the shared ``spare`` allowance lets it, and gives the allowance back at the end,
    also when the body is cut."""
    gate = threading.Event()
    hashing.submit(gate.wait, 30)  # the one hashing thread is held until the gate opens
    most = min(BUFFERS + allowance, MOST_BUFFERS)
    data = os.urandom((MOST_BUFFERS + 4) * CHUNK)
    body = GatedBody(data, Clock(), gate, open_at=most)
    if cut:
        body.left += 10  # the peer closes 10 bytes early
    spare = threading.Semaphore(allowance)
    with ThreadPoolExecutor(1) as runner:
        done = runner.submit(
            pump,
            body,
            writer,
            source="fake",
            pace=lenient(body.clock),
            landed=lambda n: None,
            stop=threading.Event(),
            hashing=hashing,
            spare=spare,
        )
        try:
            with pytest.raises(ConnectionResetError) if cut else contextlib.nullcontext():
                done.result(timeout=30)  # a pump that waits for a buffer never gets one
        finally:
            gate.set()
    assert len(body.buffers) == most
    if not cut:
        assert writer.digest() == Digest("sha256", hashlib.sha256(data).hexdigest())
    # the allowance is whole again
    assert all(spare.acquire(blocking=False) for _ in range(allowance))
    assert not spare.acquire(blocking=False)
