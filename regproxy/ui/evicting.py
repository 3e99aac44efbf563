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
from collections.abc import Mapping
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
    """``refs.live`` as it would fall when rows are dropped (read lazily, changed in memory).
    A manifest's children come with their counts and sizes in one query, and a blob has no
    children to ask for: a unit costs a query or two, not three per digest."""

    def __init__(self, index: Index) -> None:
        self.db = index.db
        #: digest -> [live, size] as read, live changed in memory
        self.refs: dict[str, list[Any]] = {}
        #: digests known to list nothing (blobs)
        self.leaves: set[str] = set()
        self.gone: set[str] = set()

    def _ref(self, digest: str) -> list[Any]:
        if digest not in self.refs:
            row = self.db.execute(
                "SELECT live, size FROM refs WHERE digest=?", (digest,)
            ).fetchone()
            self.refs[digest] = [int(row[0]), row[1]] if row else [0, None]
        return self.refs[digest]

    def _children(self, digest: str) -> list[str]:
        if digest in self.leaves:
            return []
        children = []
        for child, kind, live, size in self.db.execute(
            "SELECT x.child, x.kind, f.live, f.size FROM manifest_refs x "
            "LEFT JOIN refs f ON f.digest = x.child WHERE x.parent=?",
            (digest,),
        ):
            children.append(child)
            self.refs.setdefault(child, [int(live or 0), size])
            if kind == "blob":
                self.leaves.add(child)
        return children

    def drop(self, digest: str) -> int:
        """One reference to ``digest`` goes; the stored bytes that go with it."""
        ref = self._ref(digest)
        ref[0] -= 1
        if ref[0] > 0 or digest in self.gone:
            return 0
        self.gone.add(digest)
        freed = int(ref[1]) if ref[1] is not None else 0
        return freed + sum(self.drop(c) for c in self._children(digest))


def eviction_order(
    index: Index,
    *,
    limit: int,
    loose_age: float,
    served: Mapping[tuple[str, str], float] | None = None,
) -> list[EvictionRow]:
    """The next ``limit`` rows eviction would take. ``served``: (repository, digest) -> when,
    served since access times were last written (the index does not show those yet; eviction
    writes them first): a unit served is more recent than any time the index holds, so it
    goes after the others, in the order it was served."""
    db = index.db
    now = time.time()
    served = served or {}
    served_digests = {d for _, d in served}
    out: list[EvictionRow] = []
    for digest, size, last in db.execute(
        "SELECT f.digest, f.size, COALESCE(b.last_access, b.created, m.created) FROM refs f "
        "LEFT JOIN blobs b ON b.digest = f.digest LEFT JOIN manifests m ON m.digest = f.digest "
        "WHERE f.live = 0 AND f.size IS NOT NULL ORDER BY f.digest LIMIT ?",
        (limit,),
    ).fetchall():
        if (last or 0.0) < now - loose_age and digest not in served_digests:
            out.append(EvictionRow("", digest, int(size), float(last or 0.0), []))
    counts = _Counts(index)
    later: list[tuple[float, str, str, list[Any]]] = []

    def unit(repo: str, root: str, when: float, members: list[Any]) -> EvictionRow:
        drop = [d for d, _, row_pinned, pinned in members if not row_pinned and not pinned]
        freed = sum(counts.drop(d) for d in drop)
        tags = [
            t
            for (t,) in db.execute(
                "SELECT tag FROM tags WHERE repo=? AND digest=? ORDER BY tag LIMIT 20", (repo, root)
            )
        ]
        when = max([when, *(float(m[1] or 0.0) for m in members)])
        return EvictionRow(repo, root, freed, when, tags)

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
        times = [served[(repo, m[0])] for m in members if (repo, m[0]) in served]
        if times:
            later.append((max(times), repo, root, members))
        else:
            out.append(unit(repo, root, float(last or 0.0), members))
    for when, repo, root, members in sorted(later):
        if len(out) >= limit:
            break
        out.append(unit(repo, root, when, members))
    return out
