"""What a blob file being written does to the page cache: writeback started early
(``sync_file_range``), and, for a blob too big to keep, its pages dropped behind the writer
(:class:`DropBehind`, ``storage.drop_behind_above``).

Dropping never loses a byte: only clean pages go (``POSIX_FADV_DONTNEED``), after a wait for
their writeback, whose error is handed to the writer (the wait tells a descriptor of a writeback
error once: the commit's ``fsync`` would not hear of it again, and dropped pages would be read
back from a failed disk). A reader below the floor reads from disk.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

_SYNC_FILE_RANGE_WRITE: Final = 2
#: wait for what is under writeback in the range, start the rest, wait for all of it
_SYNC_FILE_RANGE_WAIT_ALL: Final = 1 | 2 | 4
#: a blob that drops behind keeps at least its last this many bytes in the page cache (its
#: readers are right behind the writer), and drops the bytes before them in steps of
#: :data:`DROP_STEP`
DROP_LAG: Final = 32 * 1024 * 1024
DROP_STEP: Final = 8 * 1024 * 1024
_PAGE: Final = mmap.PAGESIZE


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range: Final = _load_sync_file_range()


def start_writeback(fd: int, start: int, count: int) -> bool:
    """Ask the kernel to start writing a range out (it does not wait). False where it cannot
    (not Linux): nothing else here works then either."""
    if _sync_file_range is None:
        return False
    _sync_file_range(fd, start, count, _SYNC_FILE_RANGE_WRITE)
    return True


def no_reader() -> int:
    """The floor of a file no response reads while it is written (a push, an import)."""
    return 1 << 62


def physical_memory() -> int:
    """The host's memory in bytes (0 where the system does not say): what a fraction of
    ``storage.drop_behind_above`` is of."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def drop_file(path: Path) -> None:
    """All of a file's pages leave the page cache (it is on disk: committed). No harm if it
    is gone or the advice is refused."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class DropBehind:
    """One file's pages dropped behind its writer: at least :data:`DROP_LAG` behind the end and
    below ``floor()`` (the lowest offset a reader still needs; called on the writer's thread).
    For blobs far larger than the page cache could keep: a 10 GiB model layer would otherwise
    push out every other file's pages, and each written page costs a fresh page of memory (on
    VMs whose free memory the host takes back, a first touch costs ~7 us a page:
    benchmarks/README.md, "Cold pull, fourth pass"); the pages freed are the next chunks'."""

    def __init__(self, floor: Callable[[], int]) -> None:
        self.floor = floor
        #: where the pages were dropped up to
        self.at = 0
        #: bytes dropped
        self.dropped = 0

    def after_writeback(self, fd: int, size: int) -> None:
        """With ``size`` bytes in the file and their writeback started: wait for the writeback
        of the bytes up to the drop point, then drop their pages. OSError: the writeback failed
        (the file must not be committed)."""
        try:
            floor = self.floor()
        except Exception:  # the readers' table changed under us: next time
            return
        end = min(size - DROP_LAG, floor) // _PAGE * _PAGE
        if end - self.at < DROP_STEP or _sync_file_range is None:
            return
        start = self.at
        if _sync_file_range(fd, start, end - start, _SYNC_FILE_RANGE_WAIT_ALL) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        with contextlib.suppress(OSError):  # advice: a page kept is no harm
            os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_DONTNEED)
        self.at = end
        self.dropped += end - start

    def rewind(self, size: int) -> None:
        """The file was cut back to ``size``: drop again from there."""
        self.at = min(self.at, size // _PAGE * _PAGE)
