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
A repository's tags: :mod:`regproxy.ui.tag_list`.
"""

from __future__ import annotations

import json
import math
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
    #: ``after=`` for the next page (the last row's key), None on the last page
    next_after: str | None
    #: ``before=`` for the previous page (the first row's key), None on the first page
    prev_before: str | None


class BadKey(ValueError):
    """An ``after``/``before`` key that is not one of the list's order (the page answers 400)."""


def _keyset(
    column: str, after: str | None, before: str | None, limit: int
) -> tuple[str, str, list[Any], bool]:
    """(condition, order, arguments, reversed): a page after or before a key, LIMIT one more
    than the page to learn whether another follows."""
    if before is not None:
        return f"{column} < ?", f"{column} DESC", [before, limit + 1], True
    return f"{column} > ?", column, [after or "", limit + 1], False


def keyset_page(
    rows: list[Any], key: Any, limit: int, reverse: bool, cursor: bool, total: int
) -> Page[Any]:
    """The page of ``rows`` (read one more than ``limit``, nearest first when ``reverse``: a
    page before a key) and the keys of the pages around it; ``cursor``: it is after a key."""
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


def _others(index: Index, project: str) -> bool:
    """Whether a repository holding content is outside the project: the first one found on
    either side of its range of names (no count)."""
    row = index.db.execute(
        "SELECT EXISTS (SELECT 1 FROM repos WHERE name < ? AND manifests > 0) "
        "OR EXISTS (SELECT 1 FROM repos WHERE name >= ? AND manifests > 0)",
        (project + "/", project + "0"),
    ).fetchone()
    return bool(row[0])


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
    if q or (project and _others(index, project)):
        total = int(
            index.db.execute(f"SELECT count(*) FROM repos WHERE {where}", args).fetchone()[0]
        )
    else:  # every repository, or every one is the project's (a host's usual one project)
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
        return keyset_page(repos, lambda r: r.name, limit, reverse, after is not None, total)
    return keyset_page(repos, lambda r: repo_key(r, sort), limit, reverse, cursor_given, total)


def repo_key(row: RepoRow, sort: str) -> str:
    """The ``after``/``before`` key of a row in a :data:`REPO_SORTS` order other than name."""
    if sort == "size":
        return json.dumps([-row.size, row.name])
    pulled = row.last_access
    return json.dumps([int(pulled is None), -pulled if pulled is not None else 0, row.name])


def _key_of(text: str | None, n: int) -> list[Any] | None:
    """A key from a request (:func:`repo_key`), None for none (the first page); :class:`BadKey`
    for one that is not a key of the order."""
    if not text:
        return None
    try:
        key = json.loads(text)
    except ValueError:
        key = None
    if not isinstance(key, list) or len(key) != n or not plain_text(key[-1]):
        raise BadKey(f"not a key of this order: {text[:80]!r}")
    if not all(finite(v) for v in key[:-1]):
        raise BadKey(f"not a key of this order: {text[:80]!r}")
    return key


def plain_text(value: Any) -> bool:
    """A JSON string a key may hold: one UTF-8 can encode (JSON's ``\\ud800`` escapes give
    lone surrogates, which neither SQLite's binding nor the tag order takes)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def finite(value: Any) -> bool:
    """A JSON number a key may hold (not a bool, NaN, an infinity or beyond a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


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
