"""A blob window that had to come from disk (regproxy.sendfile.read_in, used by every body
sent from a file whose pages are not cached) asks the kernel for the bytes after it too, so
they are on their way while the window is sent, and passes through one buffer per thread (a
fresh one per window cost a fresh page of memory per 4 KiB: on the test VM that halved the
speed of a blob sent from disk)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from regproxy import sendfile
from regproxy.sendfile import READ_AHEAD, WINDOW, read_in
from tests.unit.disk import cached

MiB = 1024 * 1024


def test_a_window_read_from_disk_starts_reading_the_bytes_after_it(disk_dir: Path) -> None:
    path = disk_dir / "blob"
    with open(path, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        # no read-ahead of the kernel's own on this descriptor (8 MiB on the test VM's disk)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        # a page ahead that any disk's request limit covers (the kernel caps WILLNEED there)
        ahead = WINDOW + MiB - 4096
        assert not cached(path, ahead) and not cached(path, 0)
        read_in(fd, 0, WINDOW)
        assert cached(path, 0)
        # the reads ahead were started (not waited for): they land shortly (bounded wait)
        for _ in range(500):
            if cached(path, ahead):
                break
            time.sleep(0.01)
        assert cached(path, ahead)
        assert not cached(path, WINDOW + READ_AHEAD + 4 * MiB)  # and no further
        assert not cached(path, 20 * MiB)
        read_in(fd, 20 * MiB, WINDOW)
        assert cached(path, 20 * MiB)
    finally:
        os.close(fd)


def test_windows_read_from_disk_pass_through_one_buffer_a_thread(disk_dir: Path) -> None:
    path = disk_dir / "blob"
    path.write_bytes(os.urandom(4 * MiB))
    fd = os.open(path, os.O_RDONLY)
    try:
        read_in(fd, 0, WINDOW)
        first = sendfile._buffers.buf
        read_in(fd, WINDOW, WINDOW)
        read_in(fd, 2 * WINDOW, 1000)
        assert sendfile._buffers.buf is first
    finally:
        os.close(fd)
