"""A repository's tags for the web page: one keyset page at a time, in each of its orders.

Every order is read from an index of the schema (version 9) in its own order, never sorted
whole and never skipped into by ``OFFSET``:

- ``name`` (numbers as numbers, then the tag itself): ``tags_by_name`` (``tags.sortkey``);
- ``updated`` (when the tag last moved, newest first): ``tags_by_updated``;
- ``cached`` (when the repository got the manifest, newest first): the repository's rows by
  ``repo_manifests_created``, and the tags of each;
- ``pulled`` (last pulled first): the rows pulled since they came, by
  ``repo_manifests_pulled``, and their tags; then the tags never pulled, by name.

Tags of one manifest share its times: among themselves they go by name, which SQLite sorts one
manifest at a time (its "temp b-tree for the right part of ORDER BY"). A page reads the rows
after (or before) its key, one more than it shows to learn whether another follows. The key is
the tag in name order, else the JSON array of the row's sort values, ascending (a newer time is
a smaller negative number), and its tag, as the repository list's keys are: ``[-updated,
tag]``, ``[-cached, tag]``, ``[0, -last_pulled, tag]`` or ``[1, 0, tag]`` (never pulled). A key
the page did not make is :class:`BadKey` (the page answers 400). A tag added or removed between
two pages moves nothing else: the next page starts right after the key it was given. A filter
(pinned, not pinned) skips the rows it leaves out of the walk; where that would pass most of
the repository (a few pinned tags among many, the list of stale ones), those few are read whole
by their own index and ordered here, with the same keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from regproxy.index import Index
from regproxy.tag_order import tag_order
from regproxy.ui.queries import (
    BadKey,
    Page,
    TagRow,
    artifact,
    finite,
    keyset_page,
    plain_text,
    tree_size,
)


@dataclass(frozen=True, slots=True)
class _Part:
    """A stretch of an order: where its rows are read from, the time it goes by (newest first;
    None: by name only), a condition."""

    source: str
    time: str | None
    where: str = ""


def _tags() -> str:
    """The repository's tags first, by the index of the page's order, then each one's row."""
    return (
        "FROM tags t CROSS JOIN repo_manifests rm ON rm.repo = t.repo AND rm.digest = t.digest "
        "CROSS JOIN manifests m ON m.digest = t.digest WHERE t.repo = ?"
    )


def _rows(by: str) -> str:
    """The repository's rows first by the index ``by`` (their time), then each one's tags by
    digest. Named: without statistics SQLite would read the tags by repository alone."""
    return (
        f"FROM repo_manifests rm INDEXED BY {by} CROSS JOIN tags t INDEXED BY tags_by_digest "
        "ON t.digest = rm.digest AND t.repo = rm.repo "
        "CROSS JOIN manifests m ON m.digest = t.digest WHERE rm.repo = ?"
    )


#: how a repository's tags may be ordered (``sort=``): the parts of each, in order
TAG_ORDERS: Final = {
    "name": (_Part(_tags(), None),),
    "updated": (_Part(_tags(), "t.updated"),),
    "cached": (_Part(_rows("repo_manifests_created"), "rm.created"),),
    "pulled": (
        _Part(_rows("repo_manifests_pulled"), "rm.last_access", " AND rm.last_access > rm.created"),
        _Part(_tags(), None, " AND (rm.last_access > rm.created) IS NOT 1"),
    ),
}
#: tag filters (``show=``)
TAG_FILTERS: Final = {"all": "", "pinned": " AND rm.pinned <> 0", "cached": " AND rm.pinned = 0"}
#: the repository's pinned tags, by the pinned rows' index
_PINNED: Final = (
    "FROM repo_manifests rm INDEXED BY repo_manifests_pinned CROSS JOIN tags t "
    "INDEXED BY tags_by_digest ON t.digest = rm.digest AND t.repo = rm.repo "
    "CROSS JOIN manifests m ON m.digest = t.digest WHERE rm.repo = ? AND rm.pinned <> 0"
)
_COUNT_PINNED: Final = (
    "SELECT count(*) FROM repo_manifests rm INDEXED BY repo_manifests_pinned CROSS JOIN tags t "
    "INDEXED BY tags_by_digest ON t.digest = rm.digest AND t.repo = rm.repo "
    "WHERE rm.repo = ? AND rm.pinned <> 0"
)
#: up to how many pinned tags a page reads whole and orders itself (at least one in this many
#: of the repository's tags is pinned otherwise: a walk in an order passes few others)
FEW: Final = 2000
_COLUMNS: Final = (
    "SELECT t.tag, t.digest, m.media_type, m.artifact_type, rm.created, rm.last_access, "
    "t.updated, t.checked, rm.pinned, "
    "CASE WHEN rm.last_access > rm.created THEN rm.last_access END AS pulled "
)


@dataclass(frozen=True, slots=True)
class _Key:
    part: int
    time: float | None
    tag: str


def parse_key(sort: str, text: str) -> _Key:
    """The position a page's ``after``/``before`` names in the order; :class:`BadKey` if it is
    not a key of this order (any text is a place in name order)."""
    if sort not in TAG_ORDERS or sort == "name":
        return _Key(0, None, text)
    try:
        key = json.loads(text)
    except ValueError:
        raise BadKey(f"not a key of the tags sorted by {sort}: {text[:80]!r}") from None
    width = 3 if sort == "pulled" else 2
    if (
        not isinstance(key, list)
        or len(key) != width
        or not plain_text(key[-1])
        or not all(finite(v) for v in key[:-1])
        or (sort == "pulled" and key[0] not in (0, 1))
    ):
        raise BadKey(f"not a key of the tags sorted by {sort}: {text[:80]!r}")
    if sort == "pulled":
        return _Key(int(key[0]), -float(key[1]) if key[0] == 0 else None, key[2])
    return _Key(0, -float(key[0]), key[1])


def tag_key(sort: str, row: TagRow) -> str:
    """The ``after``/``before`` key of a row in a :data:`TAG_ORDERS` order."""
    tag = row.tag or ""
    if sort == "updated":
        return json.dumps([-(row.updated or 0.0), tag])
    if sort == "cached":
        return json.dumps([-row.cached, tag])
    if sort == "pulled":
        pulled = row.last_access
        return json.dumps([0, -pulled, tag] if pulled is not None else [1, 0, tag])
    return tag


def _part_rows(
    index: Index, part: _Part, at: _Key | None, back: bool, n: int, where: str, args: list[Any]
) -> list[Any]:
    """Up to ``n`` rows of one part after ``at`` (before it, nearest first, when ``back``)."""
    src = f"{_COLUMNS} {part.source}{part.where}{where}"
    by_name = "t.sortkey DESC, t.tag DESC" if back else "t.sortkey, t.tag"
    beyond_name = "<" if back else ">"
    if part.time is None:
        if at is None:
            return index.db.execute(f"{src} ORDER BY {by_name} LIMIT ?", [*args, n]).fetchall()
        return index.db.execute(
            f"{src} AND (t.sortkey, t.tag) {beyond_name} (?, ?) ORDER BY {by_name} LIMIT ?",
            [*args, tag_order(at.tag), at.tag, n],
        ).fetchall()
    by_time = f"{part.time} {'ASC' if back else 'DESC'}, {by_name}"
    if at is None:
        return index.db.execute(f"{src} ORDER BY {by_time} LIMIT ?", [*args, n]).fetchall()
    # the key's own time: the rest of its tags by name; then the times beyond it
    rows = index.db.execute(
        f"{src} AND {part.time} = ? AND (t.sortkey, t.tag) {beyond_name} (?, ?) "
        f"ORDER BY {by_name} LIMIT ?",
        [*args, at.time, tag_order(at.tag), at.tag, n],
    ).fetchall()
    if len(rows) < n:
        rows += index.db.execute(
            f"{src} AND {part.time} {'>' if back else '<'} ? ORDER BY {by_time} LIMIT ?",
            [*args, at.time, n - len(rows)],
        ).fetchall()
    return rows


def _walk(
    index: Index, sort: str, at: _Key | None, back: bool, n: int, where: str, args: list[Any]
) -> list[Any]:
    """Up to ``n`` rows after ``at`` (before it, nearest first) in the order, part by part."""
    parts = TAG_ORDERS[sort]
    rows: list[Any] = []
    for i in reversed(range(len(parts))) if back else range(len(parts)):
        if at is not None and (i > at.part if back else i < at.part):
            continue
        here = at if at is not None and i == at.part else None
        rows += _part_rows(index, parts[i], here, back, n - len(rows), where, args)
        if len(rows) >= n:
            break
    return rows


def _place(sort: str, part: int, time: float | None, tag: str) -> tuple[Any, ...]:
    """A row's place in the order, as a tuple Python compares as the order does."""
    name = (tag_order(tag), tag)
    if sort == "pulled":
        return (part, -(time or 0.0) if part == 0 else 0.0, *name)
    if sort in ("updated", "cached"):
        return (-(time or 0.0), *name)
    return name


def _row_place(sort: str, r: Any) -> tuple[Any, ...]:
    if sort == "pulled":
        return _place(sort, 0 if r[9] is not None else 1, r[9], r[0])
    return _place(sort, 0, r[6] if sort == "updated" else r[4], r[0])


def _window(rows: list[Any], sort: str, at: _Key | None, back: bool, n: int) -> list[Any]:
    """Up to ``n`` of ``rows`` after ``at`` (before it, nearest first) in the order."""
    ordered = sorted(rows, key=lambda r: _row_place(sort, r), reverse=back)
    if at is not None:
        mark = _place(sort, at.part, at.time, at.tag)
        ordered = [r for r in ordered if (_row_place(sort, r) < mark) == back]
        ordered = [r for r in ordered if _row_place(sort, r) != mark]
    return ordered[:n]


def _total(
    index: Index, repo: str, show: str, listed: tuple[str, list[Any]] | None, every: int | None
) -> int:
    """How many tags the page's filter matches: the repository's tags by their key (``every``
    when the caller counted them), the pinned ones by the pinned rows' index; a join per tag
    only for a list of tags."""
    if listed is not None:  # a list of tags (the stale ones): that many lookups
        where, args = listed
        sql = f"SELECT count(*) {_tags()}{where}"
        return int(index.db.execute(sql, args).fetchone()[0])
    pinned = 0
    if show in ("pinned", "cached"):
        pinned = int(index.db.execute(_COUNT_PINNED, (repo,)).fetchone()[0])
        if show == "pinned":
            return pinned
    if every is None:
        every = int(
            index.db.execute("SELECT count(*) FROM tags WHERE repo=?", (repo,)).fetchone()[0]
        )
    return every - pinned if show == "cached" else every


def repo_tags(
    index: Index,
    repo: str,
    *,
    limit: int,
    after: str | None = None,
    before: str | None = None,
    sort: str = "name",
    show: str = "all",
    only: list[str] | None = None,
    every: int | None = None,
    few: int = FEW,
) -> Page[TagRow]:
    """One page of a repository's tags in a :data:`TAG_ORDERS` order, after or before a key
    (:func:`tag_key`; :class:`BadKey` if it is none), and how many match. ``show``:
    :data:`TAG_FILTERS`; ``only``: just these tags (the stale ones); ``every``: how many tags
    the repository has, when the caller just counted them (:func:`queries.repository`);
    ``few``: up to how many pinned tags are read whole and ordered in Python."""
    sort = sort if sort in TAG_ORDERS else "name"
    back = before is not None
    text = before if back else after
    at = parse_key(sort, text) if text else None
    where = TAG_FILTERS.get(show, "")
    args: list[Any] = [repo]
    if only is not None:
        where += f" AND t.tag IN ({','.join('?' * len(only))})"
        args += only
    total = _total(index, repo, show, (where, args) if only is not None else None, every)
    if only is not None or (show == "pinned" and total <= few):
        # a few tags (stale ones, or the pinned ones of a repository that pins few): read
        # them all and order them here, rather than walk an order past every other tag
        source = _tags() if only is not None else _PINNED
        chosen = index.db.execute(f"{_COLUMNS} {source}{where}", args).fetchall()
        rows = _window(chosen, sort, at, back, limit + 1)
    else:
        rows = _walk(index, sort, at, back, limit + 1, where, args)
    out = [
        TagRow(
            r[0],
            r[1],
            r[2],
            artifact(r[3]),
            tree_size(index, r[1]) if n < limit else 0,  # the one more is not shown
            float(r[4]),
            r[9],
            r[6],
            r[7],
            bool(r[8]),
        )
        for n, r in enumerate(rows)
    ]
    return keyset_page(out, lambda t: tag_key(sort, t), limit, back, after is not None, total)
