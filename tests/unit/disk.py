"""A directory on a real disk for tests about the page cache (tmpfs keeps every page), and a
probe of whether a page is cached (``mincore``)."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]


def _fstype(path: Path) -> str:
    """The filesystem type of the mount ``path`` is on (from /proc/mounts)."""
    best, kind = "", ""
    resolved = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            point = fields[1]
            inside = resolved == point or resolved.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a disk (tmp_path, unless the run keeps it in RAM: then /var/tmp)."""
    if _fstype(tmp_path) not in ("tmpfs", "ramfs"):
        yield tmp_path
        return
    base = Path("/var/tmp")
    assert _fstype(base) not in ("tmpfs", "ramfs"), "no directory on a disk to test with"
    d = base / f"regproxy-drop-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()


def cached(path: Path, offset: int) -> bool:
    """Whether the page at ``offset`` of the file is in the page cache: ``mincore(2)`` of a
    mapping never touched (a read, even a ``RWF_NOWAIT`` one, would start the kernel's
    read-ahead on a miss)."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset // page * page)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            vec = (ctypes.c_ubyte * 1)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(page), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(page))
    finally:
        os.close(fd)
    return bool(vec[0] & 1)
