"""Access lines of a running app written the cheap way (regproxy.log.LineHandler, as
``setup_logging`` installs it): the fast lane's and aiohttp's lines are the text they always were,
the app's shutdown writes those that wait, and a stalled stream drops lines and counts them."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterator

from regproxy.log import TEXT_FORMAT, LineHandler, _TextFormatter
from regproxy.web_keys import REGISTRY_KEY
from tests.images import OCI_MANIFEST
from tests.inproc import AppDaemon
from tests.integration.test_fastpath import CREDENTIALS, REPO, Conn, fast_answers, push, request
from tests.peers import http
from tests.unit.test_log_lines import lingering

_STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


@contextlib.contextmanager
def only_line_handler(d: AppDaemon) -> Iterator[tuple[LineHandler, io.StringIO]]:
    """The root's one handler a LineHandler on a StringIO (the test's own capture handlers and
    the daemon's line keeper set aside), its writer thread lingering a minute: only a flush
    writes."""
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = io.StringIO()
    handler = LineHandler(stream)
    handler.setFormatter(_TextFormatter(TEXT_FORMAT))
    lingering(handler, stream)
    keeper = d._log
    assert keeper is not None
    logging.getLogger("regproxy").removeHandler(keeper)
    root.handlers[:] = [handler]
    try:
        yield handler, stream
    finally:
        root.handlers[:] = saved
        if d._thread is not None:  # still serving: it keeps its lines again (stop removes it)
            logging.getLogger("regproxy").addHandler(keeper)
        handler.close()


def _line(method: str, path: str, status: int, sent: int, cache: str) -> str:
    return (
        rf"{_STAMP} INFO regproxy\.access request method={method} path={re.escape(path)} "
        rf"repo=spectro-images/{REPO} status={status} bytes={sent} duration_ms=\d+\.\d "
        rf"cache={cache} upstream=local error=- user=- remote=127\.0\.0\.1 peer=-"
    )


def test_lines_are_unchanged_and_written_at_shutdown(
    app_factory: Callable[..., AppDaemon],
) -> None:
    d = app_factory({"log": {"access": True}})
    digest, body = push(d, "v1")
    d.call(d.app[REGISTRY_KEY].confirm_lookups())
    path = f"/v2/{REPO}/manifests/{digest}"
    before = fast_answers(d)
    with only_line_handler(d) as (_, stream):
        c = Conn(d)
        try:
            c.send(request("GET", path, CREDENTIALS))  # aiohttp (a first look-up, credentials)
            assert c.response()[2] == body
            c.send(request("GET", path, f"Accept: {OCI_MANIFEST}"))  # the fast lane
            assert c.response()[2] == body
            c.send(request("HEAD", path, CREDENTIALS))  # aiohttp again
            assert c.response(head_only=True)[0] == "HTTP/1.1 200 OK"
        finally:
            c.close()
        assert fast_answers(d) == before + 1
        assert "/manifests/" not in stream.getvalue()  # they wait
        d.stop()  # the app's cleanup writes them
        lines = [ln for ln in stream.getvalue().splitlines() if "/manifests/" in ln]
    assert len(lines) == 3, lines
    for line, want in zip(
        lines,
        (
            _line("GET", path, 200, len(body), "hit"),
            _line("GET", path, 200, len(body), "hit"),
            _line("HEAD", path, 200, 0, "hit"),
        ),
        strict=True,
    ):
        assert re.fullmatch(want, line), (line, want)
    # the lane's line and aiohttp's are the same but for the time and the method
    assert re.sub(r"duration_ms=\S+", "", lines[0].split(" ", 2)[2]) == re.sub(
        r"duration_ms=\S+", "", lines[1].split(" ", 2)[2]
    )


def _dropped(d: AppDaemon) -> float:
    _, _, text = http("GET", f"{d.url}/metrics")
    for line in text.decode().splitlines():
        if line.startswith("regproxy_access_lines_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("no regproxy_access_lines_dropped_total")


def test_lines_that_find_no_room_are_dropped_and_counted(
    app_factory: Callable[..., AppDaemon],
) -> None:
    d = app_factory({"log": {"access": True}})
    digest, body = push(d, "v1")
    d.call(d.app[REGISTRY_KEY].confirm_lookups())
    path = f"{d.url}/v2/{REPO}/manifests/{digest}"
    assert http("GET", path)[0] == 200  # the first look-up reads the index
    before = fast_answers(d)
    with only_line_handler(d) as (handler, stream):
        handler.limit = 0  # as if stderr had taken nothing for 4 MiB of lines
        dropped = _dropped(d)
        status, _, got = http("GET", path, headers={"Accept": OCI_MANIFEST})  # the fast lane
        assert status == 200 and got == body
        status, _, got = http("GET", path, headers={"Authorization": CREDENTIALS.split(": ")[1]})
        assert status == 200 and got == body
        # the two (aiohttp's line is written after its answer: it may come a moment later)
        deadline = time.monotonic() + 10
        while _dropped(d) < dropped + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _dropped(d) >= dropped + 2
        assert handler.dropped >= 2
        handler.flush()
        assert "/manifests/" not in stream.getvalue()
    assert fast_answers(d) == before + 1
