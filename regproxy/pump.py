"""A blob body copied from its socket into the store on a thread of its own.

For a plain-HTTP source (a peer on the LAN, an HTTP mirror or upstream) the event loop reads the
response headers, then hands the connection's socket over (see
:meth:`regproxy.upstream.answers.BlobStream.take_socket`). :func:`pump` then moves the body in
``CHUNK``-sized steps, each one ``recv_into`` one of a few buffers (``MSG_WAITALL``: one call
fills it) and a ``write`` to the temp file, while a second thread runs the ``hashlib`` update of
the chunks before. All three release the GIL, no byte is copied in Python, and the
loop hears of each chunk once it is in the file (readers send it from there with ``sendfile``). On two cores this leaves the loop free for the clients, and
takes aiohttp's body parsing (two copies and a task wake-up per socket read) off the path.

The pace is kept as on the loop (regproxy.deadline): a wait for bytes is cut in short receive
timeouts (``SO_RCVTIMEO``), and between them the thread checks whether it was told to stop, whether the
source fell below its ``min_rate`` (:class:`UpstreamTooSlow`) and whether nothing arrived for
``read_timeout`` (:class:`TimeoutError`). A body that ends early is a :class:`ConnectionError`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Final, Protocol

from regproxy.deadline import Pace
from regproxy.errors import UpstreamTooSlow
from regproxy.store import BlobWriter

#: bytes per receive, hash and write: 2 MiB took 5-7% less CPU per GiB than 1 MiB in three
#: alternating A/B runs of a cold 1 GiB pull (4-5% more GB/s; 4 MiB cost 19% more:
#: benchmarks/README.md, "Cold pull, fourth pass")
CHUNK: Final = 2 * 1024 * 1024
#: buffers a pump starts with: one being received into and written, the others waiting for
#: their hash
BUFFERS: Final = 3
#: the most a pump holds. On a busy machine the hash thread (the longest chain: SHA-256 of
#: every byte) is preempted often; with 3 buffers the pump then waited for a free one, and the
#: hash, back on a core, for the pump: on two cores both idled 10-20% of a cold pull. Up to this
#: many (taken from the pumps' shared ``spare`` allowance only when all are waiting for their
#: hash) the pump keeps receiving meanwhile (benchmarks/README.md, "Third pass"): 8 MiB
MOST_BUFFERS: Final = 4


class SocketBody(Protocol):
    """The rest of an HTTP response body, taken over from the connection that carried it."""

    #: body bytes the HTTP client had read already (they come first)
    head: bytes
    #: body bytes still to read from the socket after ``head``
    left: int
    #: the longest the source may send nothing (its ``read_timeout``)
    read_timeout: float

    def receive_into(self, buffer: memoryview) -> int:
        """Up to ``len(buffer)`` bytes, as many as it can within a short slice (0: the peer
        closed); BlockingIOError after a slice without any. On the pump's thread only."""
        ...

    def interrupt(self) -> None:
        """Wake a receive blocked on another thread (it then returns 0). Any thread."""
        ...

    def guard(self) -> AbstractContextManager[None]:
        """Turns the socket's errors into the source's errors (UpstreamError)."""
        ...

    def close(self) -> None:
        """Done with the socket (after the pump returned)."""
        ...


class Stopped(Exception):
    """The pump was told to stop (the transfer was cut or cancelled)."""


def pump(
    body: SocketBody,
    writer: BlobWriter,
    *,
    source: str,
    pace: Pace,
    landed: Callable[[int], None],
    stop: threading.Event,
    hashing: Executor,
    spare: threading.Semaphore,
) -> None:
    """Copy the whole body into ``writer`` (written and hashed), calling ``landed(n)`` after
    every ``n`` bytes that are in the file. Runs on a thread; raises what ended it early.

    The hash runs beside it on a thread of ``hashing`` (which must have one free), a few chunks
    behind: this thread receives and writes the next chunks meanwhile, in :data:`BUFFERS`
    buffers, and in more (up to :data:`MOST_BUFFERS`) while ``spare`` (one count per buffer,
    shared by the pumps of a process: it bounds their memory) lets it. It returns once the last
    chunk is hashed too, so the writer is whole when it does (and no thread touches it after).
    """
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    for _ in range(BUFFERS):
        free.put(memoryview(bytearray(CHUNK)))
    grown = 0  # buffers taken on ``spare``, given back at the end
    #: (bytes, how many, the buffer to give back once hashed)
    todo: queue.SimpleQueue[tuple[memoryview, int, bool] | None] = queue.SimpleQueue()

    def hash_all() -> None:
        while (item := todo.get()) is not None:
            buf, n, recycle = item
            writer.hash(buf[:n])
            if recycle:
                free.put(buf)

    hasher = hashing.submit(hash_all)
    try:
        if body.head:
            _store(writer, body.head, pace)
            todo.put((memoryview(body.head), len(body.head), False))
            landed(len(body.head))
            _keep_pace(pace, source)
        left = body.left
        last_byte = time.monotonic()
        while left > 0:
            if stop.is_set():
                raise Stopped
            try:
                buf = free.get_nowait()
            except queue.Empty:  # every buffer waits for its hash: one more, or wait for one
                if BUFFERS + grown < MOST_BUFFERS and spare.acquire(blocking=False):
                    grown += 1
                    buf = memoryview(bytearray(CHUNK))
                else:
                    buf = free.get()
            try:
                n = body.receive_into(buf[: min(CHUNK, left)])
            except BlockingIOError:  # a slice without a byte: look at the clocks, wait on
                free.put(buf)
                if pace.time_left() <= 0:
                    raise UpstreamTooSlow(source, pace.shortfall() or "no progress") from None
                if time.monotonic() - last_byte >= body.read_timeout:
                    raise TimeoutError(f"no body bytes for {body.read_timeout:g}s") from None
                continue
            if n == 0:
                if stop.is_set():
                    raise Stopped
                raise ConnectionResetError(f"the body ended {left} bytes early")
            last_byte = time.monotonic()
            left -= n
            _store(writer, buf[:n], pace)
            todo.put((buf, n, True))
            landed(n)
            # only now: what is in the file is hashed and landed when the pace ends the body
            # (a next source continues at the bytes landed, which must be the file's size)
            _keep_pace(pace, source)
    finally:
        todo.put(None)
        try:
            hasher.result()
        finally:
            for _ in range(grown):
                spare.release()


def _store(writer: BlobWriter, data: bytes | memoryview, pace: Pace) -> None:
    """Into the file (its hash comes from the hashing thread)."""
    writer.write_unhashed(data)
    pace.add(len(data))


def _keep_pace(pace: Pace, source: str) -> None:
    """UpstreamTooSlow if the source fell below its pace."""
    why = pace.shortfall()
    if why is not None:
        raise UpstreamTooSlow(source, why)
