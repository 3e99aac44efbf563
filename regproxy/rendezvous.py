"""Rendezvous (highest-random-weight) hashing: which host is a key's home, and who comes next.

Every host ranks the members for a key by ``score(member, key)`` and gets the same order from the
same member names (the peer URLs as configured or resolved), with no coordination and no state:
the first is the key's home. When a member leaves, only its keys move, each to the next member
of that key's own order; the others stay where they were (Thaler and Ravishankar, "Using
name-based mappings to increase hit rates", 1998).

Keys are a digest (``sha256:...``) for blobs and manifests by digest, and ``<repo>:<tag>`` for
tags. Pure: no I/O, no internal imports.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def score(member: str, key: str) -> int:
    """A 64-bit weight of ``member`` for ``key``: the same on every host, uniform over members."""
    h = hashlib.sha256(member.encode() + b"\x00" + key.encode()).digest()
    return int.from_bytes(h[:8], "big")


def order(members: Iterable[str], key: str) -> list[str]:
    """The members from the key's home down (ties, which need a 64-bit collision, by name)."""
    return sorted(members, key=lambda m: (score(m, key), m), reverse=True)


def ranked(items: Sequence[T], name: Sequence[str], key: str) -> list[T]:
    """``items`` in the key's order, ``name[i]`` being the member name of ``items[i]``."""
    weights = {n: (score(n, key), n) for n in name}
    pairs = sorted(zip(items, name, strict=True), key=lambda p: weights[p[1]], reverse=True)
    return [item for item, _ in pairs]
