"""Access lines written without a LogRecord (regproxy.log.LineHandler): the same text as the
logging module makes of them, in order with every other line, written on flush and at close,
and bounded (then dropped and counted) while the stream takes nothing."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import PurePosixPath

import pytest

from regproxy.access import ACCESS_FORMAT, write_line
from regproxy.log import TEXT_FORMAT, LineHandler, _JSONFormatter, _TextFormatter, access_line

#: the access line's arguments: plain, hostile (control characters, credentials, non-ASCII,
#: a percent sign, no remote address) and large
CASES: list[tuple[object, ...]] = [
    (
        "GET",
        "/v2/a/manifests/v1",
        "spectro-images/a",
        200,
        845,
        0.0213,
        "hit",
        "local",
        "-",
        "-",
        "127.0.0.1",
        "-",
    ),
    (
        "HEAD",
        "/v2/a\n2026-01-01 INFO regproxy.access FORGED\r\x1b[2J/x",
        "-",
        404,
        0,
        12.5,
        "-",
        "-",
        "-",
        "-",
        None,
        "-",
    ),
    (
        "GET",
        "/v2/https://u:secret@h/x/blobs/y",
        "r",
        502,
        0,
        1e-7,
        "miss",
        "https://u:p@up",
        "upstream_gone",
        "alice",
        "::1",
        "lookup",
    ),
    (
        "PUT",
        "/v2/ünïcode/ß/%41%/manifests/v1",
        "r",
        201,
        2**40,
        3600.0,
        "-",
        "-",
        "-",
        "bob smith",
        "10.0.0.1",
        "-",
    ),
    # not a str: a path object, a str subclass, a bool where %s is asked
    (
        PurePosixPath("/v2/p"),
        type("Text", (str,), {})("/v2/q"),
        True,
        200,
        0,
        0.5,
        "-",
        "-",
        "-",
        "-",
        "127.0.0.1",
        "-",
    ),
]


def _record(args: tuple[object, ...]) -> logging.LogRecord:
    return logging.LogRecord(
        "regproxy.access", logging.INFO, __file__, 1, ACCESS_FORMAT, args, None
    )


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """time.time() and time.time_ns() stand still: LogRecord and the handler read the same."""
    now_ns = 1_764_510_123_456_789_012
    monkeypatch.setattr(time, "time", lambda: now_ns / 1e9)
    monkeypatch.setattr(time, "time_ns", lambda: now_ns)
    yield


def _handler(formatter: logging.Formatter) -> tuple[LineHandler, io.StringIO]:
    stream = io.StringIO()
    handler = LineHandler(stream)
    handler.setFormatter(formatter)
    return handler, stream


def lingering(handler: LineHandler, stream: io.StringIO) -> None:
    """The writer thread writes a first line at once, then lingers a minute: the lines that
    follow wait, and only a flush (or close) writes them. The stream is emptied."""
    handler.linger = 60.0
    assert handler.queue_line("regproxy.test", "primer", ())
    deadline = time.monotonic() + 10
    while "primer" not in stream.getvalue():
        assert time.monotonic() < deadline, "the writer thread wrote nothing"
        time.sleep(0.005)
    stream.seek(0)
    stream.truncate()


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("args", CASES)
def test_an_access_line_is_the_text_logging_makes_of_it(
    fmt: str, args: tuple[object, ...], fixed_clock: None
) -> None:
    formatter = _JSONFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT)
    handler, stream = _handler(formatter)
    assert handler.queue_line("regproxy.access", ACCESS_FORMAT, args)
    handler.flush()  # written by the writer thread or by this
    expected = io.StringIO()
    reference = logging.StreamHandler(expected)
    reference.setFormatter(formatter)
    reference.handle(_record(args))
    assert stream.getvalue() == expected.getvalue()
    assert stream.getvalue().count("\n") == 1
    if fmt == "json":
        json.loads(stream.getvalue())
    handler.close()


@contextlib.contextmanager
def root_handler(linger: bool = True) -> Iterator[tuple[logging.Logger, LineHandler, io.StringIO]]:
    """regproxy.access under a LineHandler that is the root's only handler, as setup_logging
    leaves it (pytest's own capture handlers are put back afterwards); its writer lingers."""
    root = logging.getLogger()
    saved = root.handlers[:]
    handler, stream = _handler(_TextFormatter(TEXT_FORMAT))
    if linger:
        lingering(handler, stream)
    root.handlers[:] = [handler]
    logger = logging.getLogger("regproxy.access")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield logger, handler, stream
    finally:
        logger.setLevel(level)
        root.handlers[:] = saved
        handler.close()


def test_lines_keep_their_order_with_other_records() -> None:
    with root_handler() as (logger, handler, stream):
        _keep_order(logger, handler, stream)


def _keep_order(logger: logging.Logger, handler: LineHandler, stream: io.StringIO) -> None:
    notes = {"repo": "r"}
    assert write_line(logger, "GET", "/v2/one", 200, 1, 0.001, notes, "127.0.0.1")
    assert stream.getvalue() == ""  # it waits for the writer thread
    logging.getLogger("regproxy.fetch").warning("fetch.failed digest=%s", "sha256:ab")
    assert write_line(logger, "GET", "/v2/two", 200, 1, 0.001, notes, "127.0.0.1")
    handler.flush()
    lines = stream.getvalue().splitlines()
    assert [ln.split(" ", 3)[3] for ln in lines] == [
        "regproxy.access request method=GET path=/v2/one repo=r status=200 bytes=1 "
        "duration_ms=1.0 cache=- upstream=- error=- user=- remote=127.0.0.1 peer=-",
        "regproxy.fetch fetch.failed digest=sha256:ab",
        "regproxy.access request method=GET path=/v2/two repo=r status=200 bytes=1 "
        "duration_ms=1.0 cache=- upstream=- error=- user=- remote=127.0.0.1 peer=-",
    ]


def test_the_writer_thread_writes_what_waits() -> None:
    with root_handler(linger=False) as (logger, handler, stream):
        handler.linger = 0.001
        for _ in range(50):
            assert access_line(logger, ACCESS_FORMAT, CASES[0])
        deadline = time.monotonic() + 10
        while stream.getvalue().count("\n") < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stream.getvalue().count("\n") == 50


def test_close_writes_what_waits() -> None:
    """logging.shutdown (at exit) flushes and closes every handler: nothing waiting is lost."""
    with root_handler() as (logger, handler, stream):
        assert access_line(logger, ACCESS_FORMAT, CASES[0])
        assert stream.getvalue() == ""
        handler.close()
        assert stream.getvalue().count("\n") == 1


def test_another_handler_or_a_filter_gets_the_record() -> None:
    """A handler of its own or a filter sees a real LogRecord, as before."""
    seen: list[logging.LogRecord] = []
    with root_handler() as (logger, _, stream):
        logger.addFilter(lambda r: bool(seen.append(r)) or True)
        try:
            assert access_line(logger, ACCESS_FORMAT, CASES[0])
        finally:
            logger.filters.clear()
        assert stream.getvalue().count("\n") == 1  # written at once, by logging's own path
        other = logging.Handler()
        other.handle = lambda r: bool(seen.append(r))  # type: ignore[method-assign]
        logging.getLogger("regproxy").addHandler(other)
        try:
            assert access_line(logger, ACCESS_FORMAT, CASES[0])
        finally:
            logging.getLogger("regproxy").removeHandler(other)
        assert stream.getvalue().count("\n") == 2
    assert [r.getMessage() for r in seen] == [ACCESS_FORMAT % CASES[0]] * 2


class _Stalled(io.StringIO):
    """A stream whose writes wait until it is released (journald stalled)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.release.wait(30)
        return super().write(s)


def test_a_stalled_stream_bounds_what_waits_and_drops_the_rest() -> None:
    stream = _Stalled()
    handler = LineHandler(stream)
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    handler.linger = 0.0
    handler.limit = 10_000
    try:
        assert handler.queue_line("regproxy.access", ACCESS_FORMAT, CASES[0])
        assert stream.entered.wait(10)  # the writer thread is stuck in write()
        queued = 1
        while handler.queue_line("regproxy.access", ACCESS_FORMAT, CASES[0]):
            queued += 1
            assert queued < 1000, "nothing was dropped"
        assert handler.dropped == 1
        assert not handler.queue_line("regproxy.access", ACCESS_FORMAT, CASES[0])
        assert handler.dropped == 2
        stream.release.set()
        handler.flush()
        lines = stream.getvalue().splitlines()
        assert len(lines) == queued
        assert all(ln.endswith(" remote=127.0.0.1 peer=-") for ln in lines)
        # room again: lines wait once more
        assert handler.queue_line("regproxy.access", ACCESS_FORMAT, CASES[0])
    finally:
        stream.release.set()
        handler.close()


def test_lines_from_threads_are_whole_and_none_is_lost() -> None:
    """Access lines (this thread) and records of other threads, written by three writers (the
    writer thread, the threads' emits, this thread's flush): every line whole, none lost."""
    with root_handler(linger=False) as (logger, handler, stream):
        handler.linger = 0.001
        other = logging.getLogger("regproxy.test_threads")

        def warn(n: int) -> None:
            for i in range(200):
                other.warning("thread.line n=%d i=%d", n, i)

        threads = [threading.Thread(target=warn, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for _ in range(1000):
            assert access_line(logger, ACCESS_FORMAT, CASES[0])
        for t in threads:
            t.join(30)
        handler.flush()
    lines = stream.getvalue().splitlines()
    access = [ln for ln in lines if ln.endswith(" remote=127.0.0.1 peer=-")]
    warnings = [ln for ln in lines if re.search(r" WARNING regproxy.test_threads thread.line ", ln)]
    assert len(access) == 1000 and len(warnings) == 600 and len(lines) == 1600
    for n in range(3):  # each thread's lines in its order
        mine = [ln for ln in warnings if f" n={n} " in ln]
        assert [int(ln.rsplit("=", 1)[1]) for ln in mine] == list(range(200))


class _Reentrant(io.StringIO):
    """A stream whose first write logs a record of its own, as a finalizer that logs (asyncio's
    "Task was destroyed but it is pending!", an unclosed aiohttp session) does when the cyclic
    GC runs it in the middle of a write, on whichever thread that is."""

    def __init__(self) -> None:
        super().__init__()
        self.logged = False

    def write(self, s: str) -> int:
        if not self.logged:
            self.logged = True
            logging.getLogger("regproxy.test_gc").error("finalizer.said")
        return super().write(s)


@pytest.mark.parametrize("by", ["record", "writer"])
def test_a_record_logged_inside_a_write_is_written_not_a_deadlock(by: str) -> None:
    """logging's handler lock is re-entrant for this: a record logged while the handler writes
    (a finalizer, on the same thread) is written, as by logging.StreamHandler; a plain lock
    held across the write hung that thread, and with it every thread that logs after it."""
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = _Reentrant()
    handler = LineHandler(stream)
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    handler.linger = 0.0
    root.handlers[:] = [handler]
    try:
        if by == "record":
            done = threading.Thread(
                target=logging.getLogger("regproxy.test").warning, args=("a.record",), daemon=True
            )
            done.start()
            done.join(30)
            assert not done.is_alive(), "the thread that logged hangs"
        else:
            assert handler.queue_line("regproxy.access", "an.access_line", ())
            deadline = time.monotonic() + 30
            while "an.access_line" not in stream.getvalue():
                assert time.monotonic() < deadline, "the writer thread hangs"
                time.sleep(0.005)
        flusher = threading.Thread(target=handler.flush, daemon=True)
        flusher.start()
        flusher.join(30)
        assert not flusher.is_alive(), "a flush hangs"
        text = stream.getvalue()
        assert "finalizer.said" in text
        assert ("a.record" if by == "record" else "an.access_line") in text
    finally:
        root.handlers[:] = saved


def test_a_record_logged_inside_the_writer_threads_write_while_another_thread_logs() -> None:
    """The writer thread's write takes the locks in the order every emit does (logging's
    handler lock first): a record logged inside it (a finalizer) while another thread is in an
    emit, holding that lock and waiting to write, is written; taken the other way round, each
    thread held the lock the other waited for."""
    root = logging.getLogger()
    saved = root.handlers[:]
    in_write, holding = threading.Event(), threading.Event()

    class Inverting(io.StringIO):
        done = False

        def write(self, s: str) -> int:
            if not self.done and threading.current_thread().name == "regproxy-log":
                self.done = True
                in_write.set()
                lock = handler.lock
                assert lock is not None
                if not lock._is_owned():  # type: ignore[attr-defined]
                    # wait (bounded) until the other thread is in its emit, holding the lock
                    for _ in range(10_000):
                        if not lock.acquire(blocking=False):
                            break
                        lock.release()
                        time.sleep(0.001)
                    holding.set()
                logging.getLogger("regproxy.test_gc").error("finalizer.said")
            return super().write(s)

    stream = Inverting()
    handler = LineHandler(stream)
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    handler.linger = 0.0
    root.handlers[:] = [handler]
    try:
        assert handler.queue_line("regproxy.access", "an.access_line", ())
        assert in_write.wait(30)
        other = threading.Thread(
            target=logging.getLogger("regproxy.test").warning, args=("a.record",), daemon=True
        )
        other.start()
        other.join(30)
        assert not other.is_alive(), "the thread that logged hangs"
        flusher = threading.Thread(target=handler.flush, daemon=True)
        flusher.start()
        flusher.join(30)
        assert not flusher.is_alive(), "a flush hangs"
        text = stream.getvalue()
        assert all(s in text for s in ("finalizer.said", "an.access_line", "a.record"))
    finally:
        root.handlers[:] = saved
