"""glibc's malloc arenas capped at start-up: less memory held by a daemon of many threads.

glibc gives a thread that finds the main heap busy an arena of its own, up to eight per CPU,
and each keeps what it freed for its next allocation. regproxy's threads (the index's reader
and writer, eviction, hashing, the thread pool, TLS workers) each allocate now and then, so
arenas multiply while most of what they hold is free. Python allocates its small objects
through its own allocator under the interpreter lock, and regproxy's large buffers are made
once, so two arenas cost no measurable speed; measured at 1/5 of bench_scale's store, peak RSS
at the end 111 instead of 113.5 MB (two runs each, the same figures within 0.3 MB).

An operator's ``MALLOC_ARENA_MAX`` in the environment wins; a C library without ``mallopt``
(not glibc) leaves this alone.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

#: arenas at most (glibc's default: 8 per CPU)
ARENAS: Final = 2
_M_ARENA_MAX: Final = -8  # <malloc.h>


def cap_arenas(arenas: int = ARENAS) -> int | None:
    """Cap glibc's malloc arenas; the cap set, or None when the environment sets one or the C
    library has no ``mallopt``. Call before the threads start."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return None
    try:
        # the C library this process already runs on (find_library would run ldconfig)
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return arenas if mallopt(_M_ARENA_MAX, arenas) == 1 else None
