"""Blob files opened on the event loop only when that cannot wait for the disk
(regproxy.cached_open, regproxy.sendfile.open_file)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from regproxy import cached_open
from regproxy.sendfile import open_file

needs_openat2 = pytest.mark.skipif(
    not cached_open.available(), reason="no openat2 with RESOLVE_CACHED here"
)


class _Counting(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.calls: list[object] = []

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.calls.append(args[0] if args else None)
        return super().submit(fn, *args, **kwargs)


def _read_all(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 16, 0)
    finally:
        os.close(fd)


async def _opened(path: Path) -> tuple[bytes, list[object]]:
    executor = _Counting()
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        return _read_all(await open_file(path)), executor.calls
    finally:
        executor.shutdown()


@needs_openat2
async def test_a_file_whose_path_is_cached_is_opened_on_the_loop(tmp_path: Path) -> None:
    blob = tmp_path / "ab" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(b"layer bytes")
    data, handed = await _opened(blob)
    assert data == b"layer bytes"
    assert handed == []  # no thread


@needs_openat2
async def test_a_path_not_in_the_kernels_caches_is_opened_on_a_thread() -> None:
    # a thread just started: nothing has looked up its /proc entry yet (the kernel makes it at
    # the first lookup, which RESOLVE_CACHED refuses to do)
    gate = threading.Event()
    thread = threading.Thread(target=gate.wait, args=(30,), daemon=True)
    thread.start()
    try:
        status = Path(f"/proc/{os.getpid()}/task/{thread.native_id}/status")
        assert cached_open.open_cached(status) is None
        data, handed = await _opened(status)
    finally:
        gate.set()
        thread.join(30)
    assert data.startswith(b"Name:")
    assert handed == [status]
    assert cached_open.available()  # EAGAIN is no reason to stop trying


async def test_a_missing_file_raises_as_open_does(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    assert cached_open.open_cached(missing) is None
    with pytest.raises(FileNotFoundError):
        await _opened(missing)
