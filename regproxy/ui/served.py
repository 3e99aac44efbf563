""" "Last pulled" without waiting for the index: what was served since the registry's last
write of access times (every few seconds, ``registry.flush_access``), laid over the rows the
index gives for one page.

Writing those times first made the page wait for a write transaction of one row per digest
served since the last one (thousands on a busy host: hundreds of milliseconds). The rows shown
are the same either way; only an order by last pull needs the times in the index, and flushes.

A page takes ``registry.unflushed_access()`` *before* it reads the index: the write swaps in an
empty map and then commits, so a map taken after a read whose snapshot came before that commit
would miss the times in neither place (a repository pulled a second ago shown as pulled days
ago). The map taken before holds them, whichever side of the commit the read falls on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from regproxy.ui.queries import RepoRow, TagRow

Served = Mapping[tuple[str, str], float]


def _later(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def repos(rows: list[RepoRow], served: Served) -> list[RepoRow]:
    """The rows, each with the last time anything of the repository was served."""
    if not served or not rows:
        return rows
    names = {r.name for r in rows}
    last: dict[str, float] = {}
    for (repo, _), t in list(served.items()):
        if repo in names and t > last.get(repo, 0.0):
            last[repo] = t
    return [
        dataclasses.replace(r, last_access=_later(r.last_access, last[r.name]))
        if r.name in last
        else r
        for r in rows
    ]


def repo(row: RepoRow, served: Served) -> RepoRow:
    return repos([row], served)[0]


def tags(repo_name: str, rows: Iterable[TagRow], served: Served) -> None:
    """Each row's last pull, in place: a time served after the manifest came (a pull)."""
    if not served:
        return
    for row in rows:
        t = served.get((repo_name, row.digest))
        if t is not None and t > row.cached:
            row.last_access = _later(row.last_access, t)


def manifest(
    repo_name: str, digest: str, cached: float, pulled: float | None, served: Served
) -> float | None:
    """A manifest's last pull (``regproxy.ui.queries.pulled``) with what was served since."""
    t = served.get((repo_name, digest))
    return _later(pulled, t) if t is not None and t > cached else pulled
