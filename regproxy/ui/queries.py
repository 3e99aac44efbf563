"""The web page's questions to the metadata index (SQLite): bounded, paginated, no blob tree.

Every function takes the :class:`~regproxy.index.Index` and runs on an index reader thread
(``registry.db.read(queries.x, ...)``), never on the event loop. Lists in name order are
paginated by key (``after``/``before`` the name of a row, a range with a ``LIMIT``: no ``OFFSET``
scan), and the per-row figures (tags, sizes) are computed for the rows of one page only, so the
500th page costs what the first does, with 10 or 100,000 repositories. A repository's size is
the one the index keeps (``repos.size``, :mod:`regproxy.repo_sizes`), counted in the query only
for a repository whose size a change just forgot. The repository list's other orders (size,
last pull) are keyset pages too, their key the row's sort values and name (a JSON array);
ordering by size reads every matching repository's kept size (a scan of ``repos``, no walk).
A repository's tags in orders other than by name are numbered pages (``OFFSET``).
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from regproxy.index import Index
from regproxy.repo_sizes import size_sql

T = TypeVar("T")

#: digests under a manifest (itself, an index's children), for sizes
_TREE = "WITH RECURSIVE t(d) AS (SELECT ? UNION SELECT child FROM manifest_refs JOIN t ON parent = t.d) "
#: how the repository list may be ordered (``sort=``): each row's key, ascending (``size`` is
#: what the page's query computes; a repository never pulled goes last)
REPO_SORTS: Final = {
    "name": ("name",),
    "size": ("-size", "name"),
    "pulled": ("last_access IS NULL", "COALESCE(-last_access, 0)", "name"),
}
#: how a repository's tags may be ordered (``sort=``); ``name`` orders numbers as numbers
TAG_SORTS: Final = {
    "name": "t.tag COLLATE natsort",
    "pulled": "pulled IS NULL, pulled DESC, t.tag COLLATE natsort",
    "cached": "COALESCE(rm.created, t.updated) DESC, t.tag COLLATE natsort",
    "updated": "t.updated DESC, t.tag COLLATE natsort",
}
#: tag filters (``show=``)
TAG_FILTERS: Final = {
    "all": "",
    "pinned": " AND COALESCE(rm.pinned, 0) = 1",
    "cached": " AND COALESCE(rm.pinned, 0) = 0",
}
_DIGITS = re.compile(r"\d+")


def _number(m: re.Match[str]) -> str:
    digits = m.group().lstrip("0") or "0"
    return f"\x00{chr(len(digits))}{digits}"  # before any text; fewer digits, smaller


def natural_key(text: str) -> str:
    """Sort key that orders the numbers inside a name as numbers: 1.9 before 1.10 (a string
    compared as one: each number is its digit count and digits, after a NUL that puts it
    before text at the same place; sorting 10,000 tags by it takes milliseconds)."""
    return _DIGITS.sub(_number, text)


def _natural(a: str, b: str) -> int:
    ka, kb = natural_key(a), natural_key(b)
    return (ka > kb) - (ka < kb)


def _collations(index: Index) -> None:
    index.db.create_collation("natsort", _natural)


#: config media types of plain images: what the index records as their "artifact type" (the
#: OCI fallback to the config's type), which the page does not show as one
IMAGE_CONFIGS: Final = frozenset(
    {
        "application/vnd.oci.image.config.v1+json",
        "application/vnd.docker.container.image.v1+json",
    }
)


def artifact(artifact_type: str | None) -> str | None:
    return None if artifact_type in IMAGE_CONFIGS else artifact_type


def pulled(last_access: float | None, created: float | None) -> float | None:
    """When content was last served: a manifest's access time starts at its arrival (a push, a
    fetch), which is not a pull."""
    if last_access is None or (created is not None and last_access <= created):
        return None
    return float(last_access)


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
    """One page of a list, and the keys to ask for the pages around it (name order)."""

    rows: list[T]
    #: how many rows the whole list has
    total: int
    #: ``after=`` for the next page (the last row's key), None on the last page or by number
    next_after: str | None
    #: ``before=`` for the previous page (the first row's key), None on the first or by number
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
    sort: str = "name",
) -> Page[RepoRow]:
    """One page of repositories that hold content, and how many match in all (the index's
    running total when nothing filters), after or before a key: a name in name order, else
    the JSON array of a row's :data:`REPO_SORTS` key (:func:`repo_key`)."""
    where, args = _where(project, q)
    if project or q:
        total = int(
            index.db.execute(f"SELECT count(*) FROM repos WHERE {where}", args).fetchone()[0]
        )
    else:
        total = index.totals().repos
    if sort not in REPO_SORTS or sort == "name":
        cond, order, more, reverse = _keyset("name", after, before, limit)
        page = (
            "SELECT name, host, path, created, last_access, manifests, size FROM repos "
            f"WHERE {where} AND {cond} ORDER BY {order} LIMIT ?"
        )
        size, params, sort = size_sql("page"), [*args, *more], "name"
    else:
        keys = REPO_SORTS[sort]
        reverse = before is not None
        cursor = _key_of(before if reverse else after, len(keys))
        order = ", ".join(f"{k} DESC" if reverse else k for k in keys)
        sized = size_sql("repos") if sort == "size" else "size"
        cond = f"({', '.join(keys)}) {'<' if reverse else '>'} ({', '.join('?' * len(keys))})"
        page = (
            "SELECT * FROM (SELECT name, host, path, created, last_access, manifests, "
            f"{sized} AS size FROM repos WHERE {where}) "
            f"WHERE {cond if cursor else '1'} ORDER BY {order} LIMIT ?"
        )
        params = [*args, *(cursor or []), limit + 1]
        size = "page.size" if sort == "size" else size_sql("page")
    rows = index.db.execute(
        f"WITH page AS ({page}) "
        "SELECT name, host, path, created, last_access, "
        "(SELECT count(*) FROM tags t WHERE t.repo = page.name), manifests, "
        f"{size} AS size FROM page ORDER BY {order}",
        params,
    ).fetchall()
    repos = [
        RepoRow(r[0], r[1], r[2] or "", float(r[3]), r[4], int(r[5]), int(r[6]), int(r[7]))
        for r in rows
    ]
    cursor_given = after is not None or before is not None
    if sort == "name":
        return _page(repos, lambda r: r.name, limit, reverse, after is not None, total)
    return _page(repos, lambda r: repo_key(r, sort), limit, reverse, cursor_given, total)


def repo_key(row: RepoRow, sort: str) -> str:
    """The ``after``/``before`` key of a row in a :data:`REPO_SORTS` order other than name."""
    if sort == "size":
        return json.dumps([-row.size, row.name])
    pulled = row.last_access
    return json.dumps([int(pulled is None), -pulled if pulled is not None else 0, row.name])


def _key_of(text: str | None, n: int) -> list[Any] | None:
    """A key from a request (:func:`repo_key`), or None (the first page) when it is not one."""
    try:
        key = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(key, list) or len(key) != n or not isinstance(key[-1], str):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in key[:-1]):
        return None
    return key


def repository(index: Index, name: str) -> RepoRow | None:
    row = index.db.execute(
        "SELECT name, host, path, created, last_access FROM repos WHERE name=?", (name,)
    ).fetchone()
    if row is None:
        return None
    counts = index.db.execute(
        "SELECT (SELECT count(*) FROM tags WHERE repo=?), "
        "(SELECT count(*) FROM repo_manifests WHERE repo=?), "
        f"(SELECT {size_sql('repos')} FROM repos WHERE name=?)",
        (name, name, name),
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
    """Bytes of a manifest, the manifests under it and their blobs that the store holds
    (``refs.size``: one lookup a digest, where blobs and manifests took two each)."""
    row = index.db.execute(
        _TREE + "SELECT COALESCE(SUM(size), 0) FROM refs WHERE digest IN t", (digest,)
    ).fetchone()
    return int(row[0])


def repo_tags(
    index: Index,
    repo: str,
    *,
    limit: int,
    after: str | None = None,
    before: str | None = None,
    sort: str = "name",
    offset: int = 0,
    show: str = "all",
    only: list[str] | None = None,
) -> Page[TagRow]:
    """One page of a repository's tags, and how many match. By name (numbers as numbers):
    after or before a tag; by :data:`TAG_SORTS`' others: ``offset`` rows in. ``show``:
    :data:`TAG_FILTERS`; ``only``: just these tags (the stale ones)."""
    _collations(index)
    where = "t.repo=?" + TAG_FILTERS.get(show, "")
    args: list[Any] = [repo]
    if only is not None:
        where += f" AND t.tag IN ({','.join('?' * len(only))})"
        args += only
    base = (
        "FROM tags t JOIN manifests m ON m.digest = t.digest "
        "LEFT JOIN repo_manifests rm ON rm.repo = t.repo AND rm.digest = t.digest "
    )
    by_name = sort not in TAG_SORTS or sort == "name"
    columns = (
        "SELECT t.tag, t.digest, m.media_type, m.artifact_type, rm.created, rm.last_access, "
        "t.updated, t.checked, COALESCE(rm.pinned, 0), "
        "CASE WHEN rm.last_access > rm.created THEN rm.last_access END AS pulled "
    )
    if by_name:
        # the matching names sorted here (SQLite would call the collation for every pair:
        # half a second at 10,000 tags), the page's rows read by name
        names = [r[0] for r in index.db.execute(f"SELECT t.tag {base} WHERE {where}", args)]
        names.sort(key=tag_key)
        total = len(names)
        window, reverse = _window(names, after, before, limit)
        found = {
            r[0]: r
            for r in index.db.execute(
                f"{columns} {base} WHERE {where} AND t.tag IN ({','.join('?' * len(window))})",
                [*args, *window],
            )
        }
        rows = [found[t] for t in window if t in found]
    else:
        total = int(index.db.execute(f"SELECT count(*) {base} WHERE {where}", args).fetchone()[0])
        rows = index.db.execute(
            f"{columns} {base} WHERE {where} ORDER BY {TAG_SORTS[sort]} LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
    out = [
        TagRow(
            r[0],
            r[1],
            r[2],
            artifact(r[3]),
            tree_size(index, r[1]),
            float(r[4] or r[6]),
            r[9],
            r[6],
            r[7],
            bool(r[8]),
        )
        for r in rows[: limit + 1]
    ]
    if not by_name:
        return Page(out, total, None, None)
    return _page(out, lambda t: t.tag, limit, reverse, after is not None, total)


def tag_key(tag: str) -> tuple[str, str]:
    """A tag's place in name order: numbers as numbers, then the name itself (1.01 and 1.1
    are both kept, one after the other)."""
    return natural_key(tag), tag


def _window(
    names: list[str], after: str | None, before: str | None, limit: int
) -> tuple[list[str], bool]:
    """(names of the page and one more, whether reversed): after ``after``, or the ``limit``
    (and one) before ``before`` nearest first (as a keyset page in SQL reads them)."""
    if before is not None:
        end = bisect.bisect_left(names, tag_key(before), key=tag_key)
        return names[max(0, end - limit - 1) : end][::-1], True
    start = bisect.bisect_right(names, tag_key(after), key=tag_key) if after else 0
    return names[start : start + limit + 1], False


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
            artifact(r[2]),
            tree_size(index, r[0]),
            float(r[3]),
            pulled(r[4], r[3]),
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
    #: manifests it lists that the repository holds -> their bytes with their blobs
    children_held: dict[str, int]
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
    children: dict[str, int] = {}
    for child, kind, bsize, held in index.db.execute(
        "SELECT x.child, x.kind, b.size, "
        "EXISTS (SELECT 1 FROM repo_manifests r WHERE r.repo=? AND r.digest = x.child) "
        "FROM manifest_refs x LEFT JOIN blobs b ON b.digest = x.child WHERE x.parent=?",
        (repo, digest),
    ):
        if kind == "blob":
            blobs[child] = None if bsize is None else int(bsize)
        elif held:
            children[child] = tree_size(index, child)
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
        artifact_type=artifact(row[2]),
        subject=row[3],
        annotations=json.loads(row[4]) if row[4] else None,
        cached=float(row[5]),
        last_access=pulled(row[6], row[5]),
        pinned=bool(row[7]),
        tags=tags,
        total_size=tree_size(index, digest),
        blob_sizes=blobs,
        children_held=children,
        referrers=referrers,
    )


def totals(index: Index) -> dict[str, int]:
    """Counts for the overview: the index's running totals (one row, no scan), with the bytes
    no repository manifest reaches any more (deleted, or a push without its manifest): still on
    disk and in the store's size until the next eviction or gc."""
    t = index.totals()
    return {
        "repositories": t.repos,
        "tags": t.tags,
        "manifests": t.manifests,
        "blobs": t.blobs,
        "store_bytes": t.stored_bytes,
        "pinned_bytes": t.pinned_bytes,
        "unreferenced_bytes": t.loose_bytes,
    }
