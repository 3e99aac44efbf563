"""What eviction takes next, for the page: the order of :mod:`regproxy.evict_batch`, read without
changing anything (on an index reader thread).

Eviction's order: loose content first (stored, nothing references it, not accessed for
``storage.upload_ttl``), then units of unpinned repository manifests, least recently used first
(an index with its children, a subject with its referrers; a unit reachable from a pinned row is
skipped). What each frees is worked out the way the schema's reference counts would fall
(``refs.live``), carried from one unit to the next: a blob other kept content shares stays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from regproxy.evict_batch import _MEMBER, _UNIT
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


class _Counts:
    """``refs.live`` as it would fall when rows are dropped (read lazily, changed in memory)."""

    def __init__(self, index: Index) -> None:
        self.db = index.db
        self.live: dict[str, int] = {}
        self.gone: set[str] = set()

    def _get(self, digest: str) -> int:
        if digest not in self.live:
            row = self.db.execute("SELECT live FROM refs WHERE digest=?", (digest,)).fetchone()
            self.live[digest] = int(row[0]) if row else 0
        return self.live[digest]

    def drop(self, digest: str) -> int:
        """One reference to ``digest`` goes; the stored bytes that go with it."""
        left = self._get(digest) - 1
        self.live[digest] = left
        if left > 0 or digest in self.gone:
            return 0
        self.gone.add(digest)
        row = self.db.execute("SELECT size FROM refs WHERE digest=?", (digest,)).fetchone()
        freed = int(row[0]) if row and row[0] is not None else 0
        children = self.db.execute(
            "SELECT child FROM manifest_refs WHERE parent=?", (digest,)
        ).fetchall()
        return freed + sum(self.drop(c) for (c,) in children)


def eviction_order(index: Index, *, limit: int, loose_age: float) -> list[EvictionRow]:
    db = index.db
    now = time.time()
    out: list[EvictionRow] = []
    for digest, size, last in db.execute(
        "SELECT f.digest, f.size, COALESCE(b.last_access, b.created, m.created) FROM refs f "
        "LEFT JOIN blobs b ON b.digest = f.digest LEFT JOIN manifests m ON m.digest = f.digest "
        "WHERE f.live = 0 AND f.size IS NOT NULL ORDER BY f.digest LIMIT ?",
        (limit,),
    ).fetchall():
        if (last or 0.0) < now - loose_age:
            out.append(EvictionRow("", digest, int(size), float(last or 0.0), []))
    counts = _Counts(index)
    rows = db.execute(
        "SELECT last_access, repo, digest FROM repo_manifests WHERE pinned = 0 "
        "ORDER BY last_access, repo, digest"
    )
    while len(out) < limit:
        row = rows.fetchone()
        if row is None:
            break
        last, repo, root = row
        if db.execute(_MEMBER, {"repo": repo, "d": root}).fetchone()[0]:
            continue  # part of another unit (an index's child, a referrer)
        members = db.execute(_UNIT, {"root": root, "repo": repo}).fetchall()
        if not members or any(m[3] > 0 for m in members if m[0] == root):
            continue  # reachable from a pinned row: never evicted
        drop = [d for d, _, row_pinned, pinned in members if not row_pinned and not pinned]
        freed = sum(counts.drop(d) for d in drop)
        tags = [
            t
            for (t,) in db.execute(
                "SELECT tag FROM tags WHERE repo=? AND digest=? ORDER BY tag LIMIT 20", (repo, root)
            )
        ]
        when = max([float(last or 0.0), *(float(m[1] or 0.0) for m in members)])
        out.append(EvictionRow(repo, root, freed, when, tags))
    return out
