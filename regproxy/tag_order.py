"""A tag's place in the web page's name order: numbers as numbers (``1.9`` before ``1.10``),
then the tag itself. The index stores it (``tags.sortkey``, schema version 9) so that a page
of a repository's tags by name is a range of an index; nothing here knows the index."""

from __future__ import annotations

import re

_DIGITS = re.compile(r"\d+")


def _number(m: re.Match[str]) -> str:
    digits = m.group().lstrip("0") or "0"
    return f"\x00{chr(len(digits))}{digits}"  # before any text; fewer digits, smaller


def natural_key(text: str) -> str:
    """Sort key that orders the numbers inside a name as numbers: 1.9 before 1.10 (a string
    compared as one: each number is its digit count and digits, after a NUL that puts it
    before text at the same place)."""
    return _DIGITS.sub(_number, text)


def tag_order(tag: str) -> bytes:
    """``tags.sortkey``: a tag's place in name order (:func:`natural_key`, UTF-8: compared as
    bytes it orders as the text does), ties broken by the tag itself. Stored, never computed
    by SQL: the schema names no function of ours, so any SQLite reads and writes the index
    (a row written without it sorts first by name)."""
    return natural_key(tag).encode()
