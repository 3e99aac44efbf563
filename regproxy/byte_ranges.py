"""A blob request's ``Range`` header (RFC 9110): one range clamped to the blob, or a 416."""

from __future__ import annotations

import re
from typing import Final

from regproxy.errors import RangeNotSatisfiable

_RANGE_RE: Final = re.compile(r"^bytes=(\d*)-(\d*)$", re.ASCII)
#: byte positions are int64 on the wire (what distribution parses); longer numbers are refused
MAX_POSITION_DIGITS: Final = 19


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single Range; None for a whole-body answer. Malformed or outside: 416."""
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        if "," in header:
            return None  # several ranges: we answer with the whole blob, as RFC 9110 allows
        raise RangeNotSatisfiable(f"malformed Range {header[:80]!r}", size=size)
    if max(len(m.group(1)), len(m.group(2))) > MAX_POSITION_DIGITS:
        # beyond int64: no blob is that long; distribution answers 416 too
        raise RangeNotSatisfiable("range position out of bounds", size=size)
    if not m.group(1):  # suffix: last N bytes
        n = int(m.group(2))
        if n == 0:
            raise RangeNotSatisfiable("empty suffix range", size=size)
        return max(size - n, 0), size - 1
    return check_range(size, int(m.group(1)), int(m.group(2)) if m.group(2) else None)


def check_range(size: int, start: int, end: int | None) -> tuple[int, int]:
    """Clamp a single byte range to a blob; raise RangeNotSatisfiable when it lies outside."""
    if start >= size or (end is not None and end < start):
        raise RangeNotSatisfiable(
            f"bytes {start}-{'' if end is None else end} of {size}", size=size
        )
    last = size - 1 if end is None else min(end, size - 1)
    return start, last
