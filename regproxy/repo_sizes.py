"""Each repository's size: the bytes its manifests reach that the store holds, kept in
``repos.size`` (schema v6).

Counting a repository walks its manifests, their children and every blob they list (a few
hundred index lookups: milliseconds, at a million blobs), too much for 20 rows of a web page
or for sorting every repository by size. So the count is kept: the index's triggers set it to
NULL ("to count again") in the same transaction as any change that can move it (see
:data:`regproxy.schema.SIZE_TRIGGERS`), and the daemon counts the repositories that have none
in the background, the walk on a reader: on the writer it only marks a few as being counted
(:func:`claim`: ``size`` = :data:`COUNTING`), then keeps each count made on a reader after the
mark (:func:`measure`) where the mark is still there (:func:`keep`). A change meanwhile set
the size to NULL (a trigger forgets any size that is not NULL): that count is not kept, and
the repository is counted again. The walk of a repository of 5,000 manifests takes ~0.4 s;
it held the writer (every pull's and push's commit) that long when it ran there.
:func:`count_some` counts on the writer (tools that own the store: no one waits for it).
A reader uses :func:`size_sql`: the kept size when there is one, else the count made in the
same query. Either way the size shown is exact as of the reader's snapshot; what is kept
only saves the walk.
"""

from __future__ import annotations

import time
from typing import Final

from regproxy.index import Index

#: bytes a repository's manifests reach (``{repo}``: the SQL naming the repository): what a
#: delete takes away at once, though the files go at the next eviction or gc. ``refs.size`` is
#: the size of a digest the store holds (a blob or a manifest), NULL when it holds none
COUNT_SQL: Final = (
    "(WITH RECURSIVE t(d) AS (SELECT digest FROM repo_manifests WHERE repo = {repo} "
    "UNION SELECT child FROM manifest_refs JOIN t ON parent = t.d) "
    "SELECT COALESCE(SUM(size), 0) FROM refs WHERE digest IN t)"
)
#: repositories counted per statement of :func:`count_some`
BATCH: Final = 4
#: repositories the daemon marks and counts (on a reader) at a time
CLAIM: Final = 16
#: ``repos.size`` of a repository being counted on a reader (no size is negative)
COUNTING: Final = -1


def size_sql(table: str) -> str:
    """A repository's size in a query over ``table`` (an alias of ``repos`` or a row that has
    its ``name`` and ``size``): the kept size, else counted now (CASE counts only then)."""
    count = COUNT_SQL.format(repo=f"{table}.name")
    return f"(CASE WHEN {table}.size >= 0 THEN {table}.size ELSE {count} END)"


def claim(index: Index, limit: int = CLAIM) -> list[str]:
    """Mark up to ``limit`` repositories that have no size as being counted (on the writer: a
    few rows); their names."""
    with index.transaction() as db:  # (no RETURNING: SQLite before 3.35 has none)
        names = [
            str(n)
            for (n,) in db.execute("SELECT name FROM repos WHERE size IS NULL LIMIT ?", (limit,))
        ]
        db.executemany(f"UPDATE repos SET size = {COUNTING} WHERE name = ?", [(n,) for n in names])
    return names


def measure(index: Index, names: list[str]) -> list[tuple[int, str]]:
    """(size, name) of each repository, counted now (on a reader, after :func:`claim`)."""
    sql = "SELECT " + COUNT_SQL.format(repo="?")
    return [(int(index.db.execute(sql, (name,)).fetchone()[0]), name) for name in names]


def keep(index: Index, sizes: list[tuple[int, str]]) -> None:
    """Keep each count whose repository is still marked (nothing changed it since the mark)."""
    with index.transaction() as db:
        db.executemany(f"UPDATE repos SET size = ? WHERE name = ? AND size = {COUNTING}", sizes)


def unclaim(index: Index) -> None:
    """Forget the marks a count left (the daemon stopped or the count failed between
    :func:`claim` and :func:`keep`): those are counted again. A scan of ``repos``."""
    with index.transaction() as db:
        db.execute("UPDATE repos SET size = NULL WHERE size < 0")


def count_some(index: Index, seconds: float = 0.02, batch: int = BATCH) -> int:
    """Count the sizes of repositories that have none, ``batch`` a statement, in one write
    transaction of about ``seconds``; how many are still to count (0: all are kept). On the
    index's writer."""
    deadline = time.monotonic() + seconds
    with index.transaction() as db:
        while True:
            done = db.execute(
                "UPDATE repos SET size = " + COUNT_SQL.format(repo="repos.name") + " "
                "WHERE name IN (SELECT name FROM repos WHERE size IS NULL LIMIT ?)",
                (batch,),
            ).rowcount
            if done < batch or time.monotonic() >= deadline:
                break
        if done < batch:
            return 0
        row = db.execute("SELECT count(*) FROM repos WHERE size IS NULL").fetchone()
        return int(row[0])
