"""One eviction batch, planned and applied in SQL on the index's writer (``AsyncIndex.write``).

A batch is one short write transaction: it walks a page of candidates with a ``LIMIT``, drops
what may go, and stops after :data:`BUDGET_SECONDS` (lookups run on the index's readers
meanwhile, and the writer's other work queues behind one batch at most), though never before it
has dealt with one candidate (a batch always makes progress). Units go a few at a time, as many
as fit in the budget left at the time per unit measured so far (:func:`go_size`), so a batch's
work ends within about its budget; its commit then waits for the disk (an fsync, and now and
then SQLite's WAL checkpoint) on top. Nothing is loaded whole: the least recently used order
is an index (``repo_manifests_lru``), references are the counts the schema's triggers keep
(``refs``, see :mod:`regproxy.schema`), and the caller carries a keyset cursor from one batch
to the next.

Two kinds of candidates, in this order:

* **loose content**: a stored digest nothing references (``refs.live = 0``: a blob pulled by
  digest alone, a push whose manifest never came, what a ``DELETE`` left), once not accessed for
  ``storage.upload_ttl``; in digest order;
* **units**, least recently used first: an unpinned repository manifest that no other manifest of
  its repository lists (not an index's child) and that is not the referrer of one (a signature
  goes with its subject), with the rows of its repository it brings in (an index's children, its
  referrers). Skipped: a unit reachable from a pinned row anywhere (``refs.pinned``), a unit
  with a row accessed in the last ``in_use`` seconds (the walk ends there: the rest is newer),
  and a unit whose removal would delete a digest being fetched or a blob accessed that recently.

Dropping a unit's rows lowers the reference counts (triggers); every digest under it whose count
reaches zero and that is stored is then deleted from the index (blob, repository links, manifest,
its reference rows) and returned for the caller to unlink, after the transaction commits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy.index import Index

#: how long one batch may hold the index's writer
BUDGET_SECONDS: Final = 0.02
#: candidates read per query
PAGE: Final = 64

#: the values of a JSON array parameter, for ``IN``
_EACH = "(SELECT value FROM json_each(?))"
#: the unit of a repository manifest: itself, the manifests of the repository it lists, and the
#: referrers of the repository whose subject it is, recursively
_UNIT = (
    "WITH RECURSIVE u(d) AS (SELECT :root "
    "UNION SELECT x.child FROM manifest_refs x JOIN u ON x.parent = u.d "
    " JOIN repo_manifests r ON r.repo = :repo AND r.digest = x.child WHERE x.kind = 'manifest' "
    "UNION SELECT m.digest FROM manifests m JOIN u ON m.subject = u.d "
    " JOIN repo_manifests r ON r.repo = :repo AND r.digest = m.digest) "
    "SELECT u.d, r.last_access, r.pinned, COALESCE(f.pinned, 0) FROM u "
    "JOIN repo_manifests r ON r.repo = :repo AND r.digest = u.d "
    "LEFT JOIN refs f ON f.digest = u.d"
)
#: stored digests under the dropped rows that nothing references any more
_DEAD = (
    "WITH RECURSIVE t(d) AS (SELECT j.value FROM json_each(?) j "
    " JOIN refs f ON f.digest = j.value WHERE f.live = 0 "
    "UNION SELECT x.child FROM manifest_refs x JOIN t ON x.parent = t.d "
    " JOIN refs f ON f.digest = x.child WHERE f.live = 0) "
    "SELECT f.digest, f.size, b.last_access, m.digest IS NOT NULL FROM t "
    "JOIN refs f ON f.digest = t.d LEFT JOIN blobs b ON b.digest = t.d "
    "LEFT JOIN manifests m ON m.digest = t.d WHERE f.size IS NOT NULL"
)
#: (repo, digest) pairs of a JSON array of pairs, for ``(repo, digest) IN``
_PAIRS = "(SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))"
#: the units of several candidates in one query: (repo, root, member, last access, row pinned,
#: reachable from a pinned row) for each candidate that is not part of another unit
_UNITS = (
    "WITH RECURSIVE c(repo, root) AS (SELECT json_extract(value, '$[0]'), "
    " json_extract(value, '$[1]') FROM json_each(?)), "
    "roots(repo, root) AS (SELECT repo, root FROM c WHERE NOT EXISTS (SELECT 1 FROM manifest_refs"
    " x JOIN repo_manifests p ON p.repo = c.repo AND p.digest = x.parent WHERE x.child = c.root"
    " AND x.kind = 'manifest') AND NOT EXISTS (SELECT 1 FROM manifests m JOIN repo_manifests s"
    " ON s.repo = c.repo AND s.digest = m.subject WHERE m.digest = c.root"
    " AND m.subject <> c.root)), "
    "u(repo, root, d) AS (SELECT repo, root, root FROM roots "
    "UNION SELECT u.repo, u.root, x.child FROM manifest_refs x JOIN u ON x.parent = u.d "
    " JOIN repo_manifests r ON r.repo = u.repo AND r.digest = x.child WHERE x.kind = 'manifest' "
    "UNION SELECT u.repo, u.root, m.digest FROM manifests m JOIN u ON m.subject = u.d "
    " JOIN repo_manifests r ON r.repo = u.repo AND r.digest = m.digest) "
    "SELECT u.repo, u.root, u.d, r.last_access, r.pinned, COALESCE(f.pinned, 0) FROM u "
    "JOIN repo_manifests r ON r.repo = u.repo AND r.digest = u.d "
    "LEFT JOIN refs f ON f.digest = u.d"
)
#: stored digests under dropped rows ([unit, digest] pairs) that nothing references any more
_DEAD_OF = (
    "WITH RECURSIVE t(unit, d) AS (SELECT json_extract(j.value, '$[0]'), "
    " json_extract(j.value, '$[1]') FROM json_each(?) j "
    " JOIN refs f ON f.digest = json_extract(j.value, '$[1]') WHERE f.live = 0 "
    "UNION SELECT t.unit, x.child FROM manifest_refs x JOIN t ON x.parent = t.d "
    " JOIN refs f ON f.digest = x.child WHERE f.live = 0) "
    "SELECT t.unit, f.digest, f.size, b.last_access, m.digest IS NOT NULL FROM t "
    "JOIN refs f ON f.digest = t.d LEFT JOIN blobs b ON b.digest = t.d "
    "LEFT JOIN manifests m ON m.digest = t.d WHERE f.size IS NOT NULL"
)
#: units handled in one go at most (a few statements for all of them: the writer thread takes
#: the GIL back once per statement, which costs when the event loop is busy)
CHUNK: Final = 32
#: units in a go when no time per unit is known yet (a round's first go): a go cannot stop
#: halfway, and a unit took 1.2-2.5 ms here (3,000 manifests, idle), so 4 fit a batch's budget
FIRST_GO: Final = 4
#: the child of an index, or a referrer, of the same repository: part of another unit
_MEMBER = (
    "SELECT EXISTS (SELECT 1 FROM manifest_refs x JOIN repo_manifests p "
    " ON p.repo = :repo AND p.digest = x.parent WHERE x.child = :d AND x.kind = 'manifest') "
    "OR EXISTS (SELECT 1 FROM manifests m JOIN repo_manifests s "
    " ON s.repo = :repo AND s.digest = m.subject WHERE m.digest = :d AND m.subject <> :d)"
)


def _all(index: Index, sql: str, params: Any, columns: int) -> list[list[Any]]:
    """Every row of a query as one JSON value: the writer thread takes the GIL back once per
    statement, not once per row (sqlite3 lets it go at every step), which is what costs when
    the event loop keeps the GIL busy serving requests."""
    names = ", ".join(f"c{i}" for i in range(columns))
    (doc,) = index.db.execute(
        f"WITH q({names}) AS ({sql}) SELECT json_group_array(json_array({names})) FROM q", params
    ).fetchone()
    rows: list[list[Any]] = json.loads(doc)
    return rows


def _take(index: Index, table: str, columns: str, where: str, params: Any) -> list[tuple[str, str]]:
    """Delete the rows of ``table`` that match ``where``; the two ``columns`` of each (what
    the registry may have cached under them), read first in one statement (see :func:`_all`)."""
    rows = _all(index, f"SELECT {columns} FROM {table} WHERE {where}", params, 2)
    index.db.execute(f"DELETE FROM {table} WHERE {where}", params)
    return [(a, b) for a, b in rows]


@dataclass
class Evicted:
    """One evicted unit (``repo`` "" for loose content), and the bytes its removal freed."""

    repo: str
    digest: str
    bytes: int


@dataclass
class Batch:
    evicted: list[Evicted] = field(default_factory=list)
    freed: int = 0
    #: digests whose files go (after the commit)
    files: list[str] = field(default_factory=list)
    #: what the registry may have cached: repository rows, tags, blob links that went
    rows: list[tuple[str, str]] = field(default_factory=list)
    tags: list[tuple[str, str]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    #: where the next batch goes on (loose: a digest; units: last access, repo, digest)
    after_digest: str = ""
    after_row: tuple[float, str, str] = (float("-inf"), "", "")
    #: no candidate of this kind is left (or the rest is in use)
    exhausted: bool = False
    #: seconds one unit took in the last go (0: not measured): how many the next go takes
    unit_seconds: float = 0.0


def _forget(index: Index, dead: list[tuple[str, int, bool]], batch: Batch) -> None:
    """Delete stored, unreferenced digests from the index (their rows, links, references):
    a few statements for the whole set (``json_each``), not a few per digest."""
    if not dead:
        return
    db = index.db
    every = json.dumps([d for d, _, _ in dead])
    manifests = json.dumps([d for d, _, is_manifest in dead if is_manifest])
    batch.links += _take(index, "repo_blobs", "repo, digest", f"digest IN {_EACH}", (every,))
    db.execute(f"DELETE FROM blobs WHERE digest IN {_EACH}", (every,))
    if manifests != "[]":
        batch.tags += _take(index, "tags", "repo, tag", f"digest IN {_EACH}", (manifests,))
        db.execute(f"DELETE FROM manifest_refs WHERE parent IN {_EACH}", (manifests,))
        db.execute(f"DELETE FROM manifests WHERE digest IN {_EACH}", (manifests,))
    batch.files += [d for d, _, _ in dead]
    batch.freed += sum(size for _, size, _ in dead)


def go_size(want: int, left: float, unit_seconds: float, *, moved: bool) -> int:
    """How many units the next go of a batch takes: as many as the bytes still to free suggest
    (``want``), at most :data:`CHUNK`, and no more than fit in the ``left`` seconds of the
    batch's budget at ``unit_seconds`` each (the time per unit measured in the go before;
    :data:`FIRST_GO` while none was measured). A go cannot stop halfway, so this is what keeps
    a batch within its budget. 0 (the batch ends) when not one more fits, unless the batch has
    not ``moved`` yet: then one, so every batch makes progress."""
    fit = FIRST_GO if unit_seconds <= 0 else int(max(0.0, left) / unit_seconds)
    n = min(want, CHUNK, fit)
    return n if moved else max(1, n)


def _spent(started: float, budget: float, moved: bool) -> bool:
    """Whether a batch's time is up. Only once its cursor has moved by a candidate: however
    slow the disk (or long the wait for the writer's lock), every batch makes progress, and a
    round of batches never spins without evicting anything."""
    return moved and time.monotonic() - started >= budget


def evict_loose(
    index: Index,
    need: int,
    after: str,
    *,
    before: float,
    busy: Container[str],
    budget: float = BUDGET_SECONDS,
) -> Batch:
    """Stored digests nothing references, last accessed (a manifest: stored) before ``before``,
    in digest order after ``after``."""
    started = time.monotonic()
    batch = Batch(after_digest=after)
    with index.transaction():
        while batch.freed < need and not _spent(started, budget, batch.after_digest != after):
            page = sorted(
                _all(
                    index,
                    "SELECT f.digest, f.size, COALESCE(b.last_access, b.created, m.created), "
                    "m.digest IS NOT NULL FROM refs f LEFT JOIN blobs b ON b.digest = f.digest "
                    "LEFT JOIN manifests m ON m.digest = f.digest "
                    "WHERE f.live = 0 AND f.digest > ? AND f.size IS NOT NULL "
                    "ORDER BY f.digest LIMIT ?",
                    (batch.after_digest, PAGE),
                    4,
                )
            )
            if not page:
                batch.exhausted = True
                break
            for digest, size, last, is_manifest in page:
                batch.after_digest = digest
                if digest in busy or (last or 0.0) >= before:
                    continue
                _forget(index, [(digest, int(size), bool(is_manifest))], batch)
                batch.evicted.append(Evicted("", digest, int(size)))
                if batch.freed >= need or _spent(started, budget, True):
                    break
    return batch


def evict_lru(
    index: Index,
    need: int,
    after: tuple[float, str, str],
    *,
    now: float,
    in_use: float,
    busy: Container[str],
    budget: float = BUDGET_SECONDS,
    unit_seconds: float = 0.0,
) -> Batch:
    """Least recently used units after the cursor ``after`` (last access, repo, digest).

    A go of units is one set of statements for all of them and cannot stop halfway, so it
    takes as many as fit in what is left of the ``budget`` at ``unit_seconds`` each (measured
    in the go before, this batch's or the last one's, see :attr:`Batch.unit_seconds` and
    :func:`go_size`): on a busy host, where a batch runs at a lower priority
    (``AsyncIndex.write_background``) and a unit takes 10x longer, a batch still ends within
    about its budget for the writes waiting behind it."""
    started = time.monotonic()
    recent = now - in_use
    batch = Batch(after_row=after, unit_seconds=unit_seconds)
    with index.transaction():
        while batch.freed < need and not _spent(started, budget, batch.after_row != after):
            page = sorted(
                (float(last), repo, d)
                for last, repo, d in _all(
                    index,
                    "SELECT last_access, repo, digest FROM repo_manifests "
                    "INDEXED BY repo_manifests_lru WHERE pinned = 0 "
                    "AND (last_access, repo, digest) > (?, ?, ?) "
                    "ORDER BY last_access, repo, digest LIMIT ?",
                    (*batch.after_row, PAGE),
                    3,
                )
            )
            fresh = [(float(last), repo, d) for last, repo, d in page if last < recent]
            if len(fresh) < len(page) or not page:
                batch.exhausted = True  # the rest is in use or newer, or there is no more
            while (
                fresh
                and batch.freed < need
                and not _spent(started, budget, batch.after_row != after)
            ):
                # as many units as the bytes still to free suggest (from those gone so far),
                # as fit in the budget left
                units = len(batch.evicted)
                each = batch.freed / units if units and batch.freed else 0
                want = max(1, math.ceil((need - batch.freed) / each)) if each else CHUNK
                left = budget - (time.monotonic() - started)
                moved = batch.after_row != after
                n = go_size(want, left, batch.unit_seconds, moved=moved)
                if n == 0:
                    break  # the budget is spent: the rest of the page comes next batch
                chunk = fresh[:n]
                went = time.monotonic()
                used = _units(
                    index, [(r, d) for _, r, d in chunk], recent, busy, batch, need - batch.freed
                )
                batch.unit_seconds = (time.monotonic() - went) / used
                batch.after_row, fresh = chunk[used - 1], fresh[used:]
            if fresh:
                # the time (or the need) ran out before this page's fresh candidates did: the
                # walk is not over, whatever comes after them on the page
                batch.exhausted = False
                break
            if batch.exhausted:
                break
    return batch


def _units(
    index: Index,
    roots: list[tuple[str, str]],
    recent: float,
    busy: Container[str],
    batch: Batch,
    need: float,
) -> int:
    """Evict, in least recently used order, the units of these candidates that may go, with a
    few statements for all of them, stopping after the unit that frees the ``need`` bytes;
    if one of them would delete something in use, one by one instead. How many candidates
    were dealt with (the rest comes again)."""
    db = index.db
    found: dict[tuple[str, str], list[tuple[str, float, int, int]]] = {}
    for repo, root, d, last, row_pinned, pinned in _all(index, _UNITS, (json.dumps(roots),), 6):
        found.setdefault((repo, root), []).append((d, float(last or 0.0), row_pinned, pinned))
    go: list[tuple[str, str, list[str]]] = []
    for key in roots:
        members = found.get(key)
        if not members or any(pinned > 0 for d, _, _, pinned in members if d == key[1]):
            continue  # part of another unit, or reachable from a pinned row
        if max(last for _, last, _, _ in members) >= recent:
            continue
        go.append((*key, [d for d, _, rp, p in members if not rp and not p]))
    used = len(roots)
    while go:
        db.execute("SAVEPOINT units")
        tags, dead = _drop(index, go)
        if any(d in busy or last >= recent for d, (_, _, last, _) in dead.items()):
            db.execute("ROLLBACK TO units")
            db.execute("RELEASE units")
            for repo, root, _ in go:  # only the unit that needs a busy digest stays
                _unit(index, repo, root, recent, busy, batch)
            return used
        freed = [0] * len(go)
        for i, size, _, _ in dead.values():
            freed[i] += size
        enough = next((k for k in range(len(go)) if sum(freed[: k + 1]) >= need), None)
        if enough is not None and enough + 1 < len(go):
            db.execute("ROLLBACK TO units")  # fewer units do: again with those alone
            db.execute("RELEASE units")
            go, need = go[: enough + 1], float("inf")
            used = roots.index(go[-1][:2]) + 1
            continue
        _forget(index, [(d, size, m) for d, (_, size, _, m) in dead.items()], batch)
        db.execute("RELEASE units")
        batch.rows += [(repo, d) for repo, _, drop in go for d in drop]
        batch.tags += tags
        batch.evicted += [Evicted(repo, root, freed[i]) for i, (repo, root, _) in enumerate(go)]
        break
    return used


def _drop(
    index: Index, go: list[tuple[str, str, list[str]]]
) -> tuple[list[tuple[str, str]], dict[str, tuple[int, int, float, bool]]]:
    """Delete the units' rows and tags; (tags, what died: digest -> unit, size, last access,
    is a manifest)."""
    db = index.db
    pairs = json.dumps([[repo, d] for repo, _, drop in go for d in drop])
    tags = _take(index, "tags", "repo, tag", f"(repo, digest) IN {_PAIRS}", (pairs,))
    db.execute(f"DELETE FROM repo_manifests WHERE (repo, digest) IN {_PAIRS}", (pairs,))
    owners = json.dumps([[i, d] for i, (_, _, drop) in enumerate(go) for d in drop])
    dead: dict[str, tuple[int, int, float, bool]] = {}
    for i, d, size, last, is_manifest in _all(index, _DEAD_OF, (owners,), 5):
        dead.setdefault(d, (int(i), int(size), float(last or 0.0), bool(is_manifest)))
    return tags, dead


def _unit(
    index: Index, repo: str, root: str, recent: float, busy: Container[str], batch: Batch
) -> None:
    """Evict one unit if it may go (see the module docstring)."""
    db = index.db
    if db.execute(_MEMBER, {"repo": repo, "d": root}).fetchone()[0]:
        return
    members = db.execute(_UNIT, {"root": root, "repo": repo}).fetchall()
    if not members or any(m[3] > 0 for m in members if m[0] == root):
        return  # gone meanwhile, or reachable from a pinned row
    if max(m[1] or 0.0 for m in members) >= recent:
        return
    drop = [d for d, _, row_pinned, pinned in members if not row_pinned and not pinned]
    db.execute("SAVEPOINT unit")
    dropped = json.dumps(drop)
    tags = _take(index, "tags", "repo, tag", f"repo=? AND digest IN {_EACH}", (repo, dropped))
    db.execute(f"DELETE FROM repo_manifests WHERE repo=? AND digest IN {_EACH}", (repo, dropped))
    dead = [
        (d, int(size), last, bool(is_manifest))
        for d, size, last, is_manifest in db.execute(_DEAD, (dropped,))
    ]
    if any(d in busy or (last or 0.0) >= recent for d, _, last, _ in dead):
        db.execute("ROLLBACK TO unit")
        db.execute("RELEASE unit")
        return
    freed_before = batch.freed
    _forget(index, [(d, size, m) for d, size, _, m in dead], batch)
    db.execute("RELEASE unit")
    batch.rows += [(repo, d) for d in drop]
    batch.tags += tags
    batch.evicted.append(Evicted(repo, root, batch.freed - freed_before))
