"""The kernel's name of a thread, so ``top -H``, ``/proc/PID/task/*/comm`` and per-thread CPU
samplers tell the daemon's threads apart.

Python before 3.14 names a thread only for itself (``threading.Thread(name=...)``); the kernel
keeps calling every thread of the process ``python3``. :func:`kernel_name` copies the Python
name into the kernel's (``prctl(PR_SET_NAME)``, at most 15 bytes, ``regproxy-`` dropped:
``index-read_0``, ``unlink_3``). It is a ``ThreadPoolExecutor`` initializer, or the first
call of a thread's target. Where ``prctl`` is missing (not Linux) it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import Final

#: prctl(2): set the calling thread's name (at most 16 bytes with the NUL)
PR_SET_NAME: Final = 15
NAME_BYTES: Final = 15
PREFIX: Final = "regproxy-"


@functools.cache
def _prctl() -> Callable[..., int] | None:
    try:
        fn: Callable[..., int] = ctypes.CDLL(None).prctl  # the process's own libc
    except (OSError, AttributeError):
        return None
    return fn


def short(name: str) -> bytes:
    """The kernel's name for a Python thread name: without ``regproxy-``, cut to 15 bytes."""
    name = name.removeprefix(PREFIX)
    return name.encode("utf-8", "replace")[:NAME_BYTES]


def kernel_name() -> None:
    """Give the calling thread its Python name in the kernel too (see the module docstring)."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_NAME, ctypes.c_char_p(short(threading.current_thread().name)), 0, 0, 0)
