"""Opening a file on the event loop when that cannot wait for the disk.

``open(2)`` may read the disk (a directory or inode not in memory), so blob files are opened on
a worker thread; the hand-off and the two wake-ups cost the event loop more than the open itself
(~30 µs against ~2). Linux 5.12's ``openat2(2)`` with ``RESOLVE_CACHED`` opens only if every
step of the path is in the kernel's caches and fails with ``EAGAIN`` otherwise (also where a
filesystem must check a cached entry again, as NFS or ``/proc``). :func:`open_cached` tries it;
None means "open it on a thread" (not cached, or no ``openat2`` here: an older kernel, another
architecture, a seccomp filter that refuses it; then it is not tried again).

Python 3.11 has no ``os.openat2``, so the system call is made through ``ctypes``; its number is
the same on every architecture listed in :data:`_ARCHS` (the common table since Linux 5.1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final, cast

_SYS_OPENAT2: Final = 437
_ARCHS: Final = frozenset({"x86_64", "aarch64", "arm64", "armv7l", "armv8l", "riscv64"})
_RESOLVE_CACHED: Final = 0x20
_AT_FDCWD: Final = -100
_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC
#: errors that say openat2 or RESOLVE_CACHED is not available here: stop trying
_UNAVAILABLE: Final = frozenset({errno.ENOSYS, errno.EINVAL, errno.EPERM, errno.E2BIG})


class _OpenHow(ctypes.Structure):
    """``struct open_how`` (linux/openat2.h)."""

    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _syscall() -> Callable[..., int] | None:
    if sys.platform != "linux" or platform.machine() not in _ARCHS:
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t]
    return cast("Callable[..., int]", call)


_call = _syscall()
_HOW: Final = _OpenHow(_FLAGS, 0, _RESOLVE_CACHED)


def open_cached(path: Path) -> int | None:
    """A read-only descriptor of ``path`` opened without waiting for the disk, or None: open
    it on a thread (which also raises what the open would raise, such as FileNotFoundError)."""
    global _call
    if _call is None:
        return None
    fd = int(
        _call(_SYS_OPENAT2, _AT_FDCWD, os.fsencode(path), ctypes.byref(_HOW), ctypes.sizeof(_HOW))
    )
    if fd >= 0:
        return fd
    if ctypes.get_errno() in _UNAVAILABLE:
        _call = None
    return None


def available() -> bool:
    """Whether :func:`open_cached` tries to open at all here (or always answers None)."""
    return _call is not None
