"""Sizes as people read them (the web page and the command line write them the same way)."""

from __future__ import annotations

from typing import Final

#: bytes a blob moves in at once between the store, a transfer and a client (a file read that
#: a response waits for, a TLS write)
BLOB_CHUNK: Final = 256 * 1024
#: bytes per read where nobody waits on each piece: hashing or copying a whole file, an
#: upstream body streamed into a transfer
BULK_CHUNK: Final = 1024 * 1024


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``-``."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover - the loop returns at TiB
