"""The web page's questions to the metadata index (SQLite): bounded, paginated, no blob tree.

Every function takes the :class:`~regproxy.index.Index` and runs on an index reader thread
(``registry.db.read(queries.x, ...)``), never on the event loop. Lists are paginated by key
(``after``/``before`` the name of a row, a range over the primary key with a ``LIMIT``: no
``OFFSET`` scan), and the per-row figures (tags, sizes) are computed for the rows of one page
only, so the 500th page costs what the first does, with 10 or 100,000 repositories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from regproxy.index import Index

T = TypeVar("T")

#: digests under a manifest (itself, an index's children), for sizes
_TREE = "WITH RECURSIVE t(d) AS (SELECT ? UNION SELECT child FROM manifest_refs JOIN t ON parent = t.d) "


@dataclass(frozen=True, slots=True)
class RepoRow:
    name: str
    host: str | None
    path: str
    created: float
    last_access: float | None
    tags: int
    manifests: int
    size: int

    @property
    def project(self) -> str:
        return self.name.split("/", 1)[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "project": self.project,
            "upstream": self.host,
            "path": self.path,
            "tags": self.tags,
            "manifests": self.manifests,
            "size": self.size,
            "created": self.created,
            "last_pulled": self.last_access,
        }


@dataclass(slots=True)
class TagRow:
    tag: str | None  # None: a manifest held without a tag
    digest: str
    media_type: str
    artifact_type: str | None
    size: int  # the manifest, its blobs, and its children's (what the store holds)
    cached: float  # when the repository got the manifest
    last_access: float | None
    updated: float | None  # when the tag last moved
    checked: float | None  # when the tag was last confirmed upstream
    pinned: bool
    platforms: list[str] = field(default_factory=list)
    stale: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "digest": self.digest,
            "media_type": self.media_type,
            "artifact_type": self.artifact_type,
            "platforms": self.platforms,
            "size": self.size,
            "cached": self.cached,
            "last_pulled": self.last_access,
            "updated": self.updated,
            "checked": self.checked,
            "pinned": self.pinned,
            "stale": self.stale,
        }


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


@dataclass(slots=True)
class Page(Generic[T]):
    """One page of a list in key order, and the keys to ask for the pages around it."""

    rows: list[T]
    #: how many rows the whole list has
    total: int
    #: ``after=`` for the next page (the last row's key), None on the last page
    next_after: str | None
    #: ``before=`` for the previous page (the first row's key), None on the first page
    prev_before: str | None


def _keyset(
    column: str, after: str | None, before: str | None, limit: int
) -> tuple[str, str, list[Any], bool]:
    """(condition, order, arguments, reversed): a page after or before a key, LIMIT one more
    than the page to learn whether another follows."""
    if before is not None:
        return f"{column} < ?", f"{column} DESC", [before, limit + 1], True
    return f"{column} > ?", column, [after or "", limit + 1], False


def _page(
    rows: list[Any], key: Any, limit: int, reverse: bool, cursor: bool, total: int
) -> Page[Any]:
    more = len(rows) > limit
    rows = rows[:limit]
    if reverse:
        rows.reverse()
    nxt = key(rows[-1]) if rows and (more or reverse) else None
    prev = key(rows[0]) if rows and ((more and reverse) or (cursor and not reverse)) else None
    return Page(rows, total, nxt, prev)


def _where(project: str | None, q: str | None) -> tuple[str, list[Any]]:
    where = ["manifests > 0"]  # repositories holding content (a count the index keeps)
    args: list[Any] = []
    if project:
        # a range over the primary key: "<project>/" <= name < "<project>0" ('0' follows '/')
        where.append("name >= ? AND name < ?")
        args += [project + "/", project + "0"]
    if q:
        where.append("name LIKE ? ESCAPE '\\'")
        args.append(_like(q.lower()))
    return " AND ".join(where), args


def projects(index: Index) -> list[tuple[str, int]]:
    """(project, repositories holding content) of every project, by name."""
    rows = index.db.execute(
        "SELECT CASE WHEN instr(name, '/') > 0 THEN substr(name, 1, instr(name, '/') - 1) "
        "ELSE name END AS p, count(*) FROM repos "
        "WHERE manifests > 0 GROUP BY p ORDER BY p"
    ).fetchall()
    return [(str(p), int(n)) for p, n in rows]


def repositories(
    index: Index,
    *,
    project: str | None,
    q: str | None,
    limit: int,
    after: str | None = None,
    before: str | None = None,
) -> Page[RepoRow]:
    """One page of repositories (by name) that hold content, after or before a name, and how
    many match in all (the index's running total when nothing filters)."""
    where, args = _where(project, q)
    if project or q:
        total = int(
            index.db.execute(f"SELECT count(*) FROM repos WHERE {where}", args).fetchone()[0]
        )
    else:
        total = index.totals().repos
    cond, order, more, reverse = _keyset("name", after, before, limit)
    rows = index.db.execute(
        "WITH page AS (SELECT name, host, path, created, last_access, manifests FROM repos "
        f"WHERE {where} AND {cond} ORDER BY {order} LIMIT ?) "
        "SELECT name, host, path, created, last_access, "
        "(SELECT count(*) FROM tags t WHERE t.repo = page.name), manifests, "
        "(SELECT COALESCE(SUM(b.size), 0) FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest "
        " WHERE rb.repo = page.name) + "
        "(SELECT COALESCE(SUM(m.size), 0) FROM repo_manifests rm JOIN manifests m "
        " ON m.digest = rm.digest WHERE rm.repo = page.name) "
        f"FROM page ORDER BY {order}",
        [*args, *more],
    ).fetchall()
    repos = [
        RepoRow(r[0], r[1], r[2] or "", float(r[3]), r[4], int(r[5]), int(r[6]), int(r[7]))
        for r in rows
    ]
    return _page(repos, lambda r: r.name, limit, reverse, after is not None, total)


def repository(index: Index, name: str) -> RepoRow | None:
    row = index.db.execute(
        "SELECT name, host, path, created, last_access FROM repos WHERE name=?", (name,)
    ).fetchone()
    if row is None:
        return None
    counts = index.db.execute(
        "SELECT (SELECT count(*) FROM tags WHERE repo=?), "
        "(SELECT count(*) FROM repo_manifests WHERE repo=?), "
        "(SELECT COALESCE(SUM(b.size), 0) FROM repo_blobs rb JOIN blobs b ON b.digest = rb.digest "
        " WHERE rb.repo=?) + (SELECT COALESCE(SUM(m.size), 0) FROM repo_manifests rm "
        " JOIN manifests m ON m.digest = rm.digest WHERE rm.repo=?)",
        (name, name, name, name),
    ).fetchone()
    return RepoRow(
        row[0],
        row[1],
        row[2] or "",
        float(row[3]),
        row[4],
        int(counts[0]),
        int(counts[1]),
        int(counts[2]),
    )


def tree_size(index: Index, digest: str) -> int:
    """Bytes of a manifest, the manifests under it and their blobs that the store holds."""
    row = index.db.execute(
        _TREE + "SELECT (SELECT COALESCE(SUM(size), 0) FROM manifests WHERE digest IN t) + "
        "(SELECT COALESCE(SUM(size), 0) FROM blobs WHERE digest IN t)",
        (digest,),
    ).fetchone()
    return int(row[0])


def repo_tags(
    index: Index, repo: str, *, limit: int, after: str | None = None, before: str | None = None
) -> Page[TagRow]:
    """One page of a repository's tags (by name) after or before a tag, and the number of tags."""
    total = int(index.db.execute("SELECT count(*) FROM tags WHERE repo=?", (repo,)).fetchone()[0])
    cond, order, more, reverse = _keyset("t.tag", after, before, limit)
    rows = index.db.execute(
        "SELECT t.tag, t.digest, m.media_type, m.artifact_type, rm.created, rm.last_access, "
        "t.updated, t.checked, COALESCE(rm.pinned, 0) FROM tags t "
        "JOIN manifests m ON m.digest = t.digest "
        "LEFT JOIN repo_manifests rm ON rm.repo = t.repo AND rm.digest = t.digest "
        f"WHERE t.repo=? AND {cond} ORDER BY {order} LIMIT ?",
        (repo, *more),
    ).fetchall()
    out = [
        TagRow(
            r[0],
            r[1],
            r[2],
            r[3],
            tree_size(index, r[1]),
            float(r[4] or r[6]),
            r[5],
            r[6],
            r[7],
            bool(r[8]),
        )
        for r in rows[: limit + 1]
    ]
    return _page(out, lambda t: t.tag, limit, reverse, after is not None, total)


def untagged(index: Index, repo: str, *, limit: int) -> list[TagRow]:
    """Manifests the repository holds that no tag names and no manifest of it lists."""
    rows = index.db.execute(
        "SELECT rm.digest, m.media_type, m.artifact_type, rm.created, rm.last_access, rm.pinned "
        "FROM repo_manifests rm JOIN manifests m ON m.digest = rm.digest WHERE rm.repo=? "
        "AND NOT EXISTS (SELECT 1 FROM tags t WHERE t.repo = rm.repo AND t.digest = rm.digest) "
        "AND NOT EXISTS (SELECT 1 FROM manifest_refs x JOIN repo_manifests p "
        " ON p.digest = x.parent AND p.repo = rm.repo WHERE x.child = rm.digest) "
        "ORDER BY rm.created DESC LIMIT ?",
        (repo, limit),
    ).fetchall()
    return [
        TagRow(
            None,
            r[0],
            r[1],
            r[2],
            tree_size(index, r[0]),
            float(r[3]),
            r[4],
            None,
            None,
            bool(r[5]),
        )
        for r in rows
    ]


@dataclass(slots=True)
class ManifestInfo:
    repo: str
    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    subject: str | None
    annotations: dict[str, str] | None
    cached: float
    last_access: float | None
    pinned: bool
    tags: list[str]
    total_size: int
    #: digest -> size of the blobs it lists that the store holds (None: not held)
    blob_sizes: dict[str, int | None]
    #: digests of manifests it lists that the repository holds
    children_held: set[str]
    #: manifests of this repository whose subject is this one (signatures, SBOMs)
    referrers: list[tuple[str, str, str | None, int]]


def manifest_info(index: Index, repo: str, digest: str) -> ManifestInfo | None:
    row = index.db.execute(
        "SELECT m.media_type, m.size, m.artifact_type, m.subject, m.annotations, rm.created, "
        "rm.last_access, rm.pinned FROM repo_manifests rm JOIN manifests m "
        "ON m.digest = rm.digest WHERE rm.repo=? AND rm.digest=?",
        (repo, digest),
    ).fetchone()
    if row is None:
        return None
    tags = [
        r[0]
        for r in index.db.execute(
            "SELECT tag FROM tags WHERE repo=? AND digest=? ORDER BY tag", (repo, digest)
        )
    ]
    blobs: dict[str, int | None] = {}
    children: set[str] = set()
    for child, kind, bsize, held in index.db.execute(
        "SELECT x.child, x.kind, b.size, "
        "EXISTS (SELECT 1 FROM repo_manifests r WHERE r.repo=? AND r.digest = x.child) "
        "FROM manifest_refs x LEFT JOIN blobs b ON b.digest = x.child WHERE x.parent=?",
        (repo, digest),
    ):
        if kind == "blob":
            blobs[child] = None if bsize is None else int(bsize)
        elif held:
            children.add(child)
    referrers = [
        (r[0], r[1], r[2], int(r[3]))
        for r in index.db.execute(
            "SELECT m.digest, m.media_type, m.artifact_type, m.size FROM manifests m "
            "JOIN repo_manifests r ON r.digest = m.digest WHERE m.subject=? AND r.repo=? "
            "ORDER BY m.digest LIMIT 200",
            (digest, repo),
        )
    ]
    return ManifestInfo(
        repo=repo,
        digest=digest,
        media_type=row[0],
        size=int(row[1]),
        artifact_type=row[2],
        subject=row[3],
        annotations=json.loads(row[4]) if row[4] else None,
        cached=float(row[5]),
        last_access=row[6],
        pinned=bool(row[7]),
        tags=tags,
        total_size=tree_size(index, digest),
        blob_sizes=blobs,
        children_held=children,
        referrers=referrers,
    )


def totals(index: Index) -> dict[str, int]:
    """Counts for the overview: the index's running totals (one row, no scan)."""
    t = index.totals()
    return {
        "repositories": t.repos,
        "tags": t.tags,
        "manifests": t.manifests,
        "blobs": t.blobs,
        "store_bytes": t.stored_bytes,
        "pinned_bytes": t.pinned_bytes,
    }
