"""What eviction takes next, for the page: eviction's own plan (``regproxy.evict.plan``) over the
whole index with nothing counted as in use, read on an index reader thread."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from regproxy import evict
from regproxy.index import Index


@dataclass(frozen=True, slots=True)
class EvictionRow:
    repo: str  # "" for content no repository manifest reaches
    digest: str
    bytes: int  # what evicting it frees (blobs other content shares stay)
    last_access: float
    tags: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.repo or None,
            "digest": self.digest,
            "bytes": self.bytes,
            "last_access": self.last_access,
            "tags": self.tags,
        }


def eviction_order(index: Index, *, limit: int, loose_age: float) -> list[EvictionRow]:
    """What eviction would remove first, in its order (its own plan, over the whole index, with
    nothing counted as in use): least recently used unpinned content, and what each frees."""
    snap = index.usage_snapshot()
    plan = evict.plan(snap, need=1 << 62, now=time.time(), in_use=0.0, loose_age=loose_age)
    last = {(r, d): a for r, d, a, _ in snap.rows}
    out = []
    for e in plan.evicted[:limit]:
        tags = [
            r[0]
            for r in index.db.execute(
                "SELECT tag FROM tags WHERE repo=? AND digest=? ORDER BY tag LIMIT 20",
                (e.repo, e.digest),
            )
        ]
        when = last.get((e.repo, e.digest))
        if when is None:
            blob = snap.blobs.get(e.digest)
            when = blob[1] if blob else snap.manifests.get(e.digest, (0, None, 0.0))[2]
        out.append(EvictionRow(e.repo, e.digest, e.bytes, float(when), tags))
    return out
