"""A body through the transport (TLS): regproxy.sendfile's chunk loop against a fake response,
over a real file. The bytes go out whole and in order, a client that takes nothing is cut after
``http.write_timeout`` (one timer moved on per chunk), a file shorter than its record is a cut."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web

from regproxy.config import HttpConfig
from regproxy.request_limits import HTTP_KEY
from regproxy.sendfile import SEND_ERRORS, Stalled, _send_chunks, _Sent
from regproxy.units import BLOB_CHUNK


class FakeResponse:
    """Takes ``takes`` writes, then none: each later write waits for ever (a stalled reader)."""

    def __init__(self, takes: int = 1 << 30) -> None:
        self.takes = takes
        self.chunks: list[bytes] = []

    async def write(self, data: bytes) -> None:
        if len(self.chunks) >= self.takes:
            await asyncio.Event().wait()
        self.chunks.append(bytes(data))


def request(write_timeout: float = 60.0) -> Any:
    app = web.Application()
    app[HTTP_KEY] = HttpConfig(write_timeout=write_timeout)
    return SimpleNamespace(app=app)


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes]]:
    data = os.urandom(3 * BLOB_CHUNK + 1234)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    yield fd, data
    os.close(fd)


async def test_the_bytes_go_out_whole_in_order_in_chunks(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    resp, sent = FakeResponse(), _Sent()
    await _send_chunks(request(), resp, fd, 100, len(data) - 100, sent)  # type: ignore[arg-type]
    assert b"".join(resp.chunks) == data[100:] and sent.n == len(data) - 100
    assert max(len(c) for c in resp.chunks) == BLOB_CHUNK


async def test_a_reader_that_stops_taking_is_cut_after_write_timeout(
    blob: tuple[int, bytes],
) -> None:
    fd, data = blob
    resp, sent = FakeResponse(takes=2), _Sent()
    with pytest.raises(Stalled):
        await asyncio.wait_for(
            _send_chunks(request(0.05), resp, fd, 0, len(data), sent),  # type: ignore[arg-type]
            timeout=30,  # a bound on the test, not the figure
        )
    assert sent.n == 2 * BLOB_CHUNK and Stalled in SEND_ERRORS


async def test_a_file_shorter_than_its_record_is_a_cut(blob: tuple[int, bytes]) -> None:
    fd, data = blob
    resp, sent = FakeResponse(), _Sent()
    with pytest.raises(EOFError):
        await _send_chunks(request(), resp, fd, 0, len(data) + 10, sent)  # type: ignore[arg-type]
    assert b"".join(resp.chunks) == data
