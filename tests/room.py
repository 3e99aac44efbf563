"""A small disk for room-on-disk tests: the store's filesystem as ``Space`` sees it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def small_disk_usage(store: Path, size: int, others: int = 0) -> Callable[[], tuple[int, int]]:
    """(total, free) of a filesystem of ``size`` bytes: free is what the host's other workloads
    (``others`` bytes) and the store's blobs and temp files leave of it (the real disk stays as
    it is). For ``registry.space.disk``."""

    def usage() -> tuple[int, int]:
        used = sum(
            f.stat().st_size
            for part in ("blobs", "tmp")
            for f in (store / part).rglob("*")
            if f.is_file()
        )
        return size, max(0, size - others - used)

    return usage
