"""Each repository's size: the bytes its manifests reach that the store holds, kept in
``repos.size`` (schema v6).

Counting a repository walks its manifests, their children and every blob they list (a few
hundred index lookups: milliseconds, at a million blobs), too much for 20 rows of a web page
or for sorting every repository by size. So the count is kept: the index's triggers set it to
NULL ("to count again") in the same transaction as any change that can move it (see
:data:`regproxy.schema.SIZE_TRIGGERS`), and :func:`count_some`, on the index's writer, counts
the repositories that have none, a few at a time. A reader uses :func:`size_sql`: the kept
size when there is one, else the count made in the same query. Either way the size shown is
exact as of the reader's snapshot; what is kept only saves the walk.
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


def size_sql(table: str) -> str:
    """A repository's size in a query over ``table`` (an alias of ``repos`` or a row that has
    its ``name`` and ``size``): the kept size, else counted now (COALESCE counts only then)."""
    return f"COALESCE({table}.size, {COUNT_SQL.format(repo=f'{table}.name')})"


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
