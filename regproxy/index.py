"""The metadata index: SQLite in WAL mode beside the blobs. Synchronous, one connection.

The daemon never calls it from the event loop: :class:`regproxy.async_index.AsyncIndex` runs
every method on the index's writer thread, or on a reader thread with a read-only
:class:`Index` of its own. Start-up, listing, eviction and the UI read this, never the blob
tree. The schema and its migrations are in :mod:`regproxy.schema`. A write on a full disk is
:class:`~regproxy.errors.StorageFull` (507), as a blob write is: see :func:`call`.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from regproxy import schema
from regproxy.errors import StorageFull
from regproxy.index_rows import ManifestAdded as ManifestAdded
from regproxy.index_rows import ManifestRecord as ManifestRecord
from regproxy.index_rows import ManifestRow as ManifestRow
from regproxy.index_rows import PinRow as PinRow
from regproxy.index_rows import Totals as Totals
from regproxy.tag_order import tag_order

T = TypeVar("T")
#: the columns :func:`_manifest_row` reads, in its order (``m`` is the manifests table)
_MANIFEST_COLUMNS: Final = (
    "m.digest, m.media_type, m.size, m.artifact_type, m.subject, m.annotations"
)


class Index:
    """One connection to the index. ``readonly``: a reader beside the writer (never migrates,
    refuses writes)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._db: sqlite3.Connection | None = None
        #: while this connection holds the write lock (in a write transaction of
        #: :meth:`transaction`): its ``data_version`` read right after taking it; else None. No
        #: other connection commits while it is set (see :meth:`writing_unchanged`)
        self.locked_version: int | None = None
        #: held by the thread using the connection (across a write transaction, and across a
        #: whole call of ``AsyncIndex.write``): another thread may read on it only when it is free
        self.busy = threading.RLock()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._db = schema.connect(self.path, readonly=self.readonly)
            except sqlite3.OperationalError as exc:
                # a full disk: SQLite cannot make the WAL's -shm/-wal files ("disk I/O error")
                if not _no_room(self.path.parent):
                    raise
                raise StorageFull(
                    f"the metadata index {self.path} could not be opened: no space left on its "
                    f"filesystem ({exc})"
                ) from exc
        return self._db

    def open(self) -> None:
        _ = self.db

    def require_current(self) -> None:
        """For a command that only reads: refuse an index of another schema (never upgrade)."""
        schema.require_current(self.db, self.path)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _tx(self) -> Any:
        return _Transaction(self)

    def writing_unchanged(self, version: int) -> bool:
        """Whether this connection holds the write lock right now, taken while its
        :meth:`data_version` was still ``version``: then no other connection committed since
        it read ``version``, nor can until this transaction ends. Asked from any thread (an
        attribute read): another thread may confirm its cached lookups while this one writes."""
        return self.locked_version == version

    # --- repositories ---------------------------------------------------------------------------
    def ensure_repo(self, name: str, host: str | None, path: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO repos(name, host, path, created) VALUES(?,?,?,?)",
            (name, host, path, time.time()),
        )

    def repo_exists(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM repos WHERE name=?", (name,)).fetchone() is not None

    def catalog(self, n: int | None, last: str | None) -> list[str]:
        """Repositories holding content, by name after ``last`` (a keyset page)."""
        q = "SELECT name FROM repos WHERE name > ? AND manifests > 0 ORDER BY name"
        args: list[Any] = [last or ""]
        if n is not None:
            q += " LIMIT ?"
            args.append(n)
        return [r[0] for r in self.db.execute(q, args)]

    # --- blobs -----------------------------------------------------------------------------------
    def add_blob(self, repo: str, digest: str, size: int) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO blobs(digest, size, created, last_access) VALUES(?,?,?,?) "
                "ON CONFLICT(digest) DO UPDATE SET last_access=excluded.last_access",
                (digest, size, now, now),
            )
            db.execute("INSERT OR IGNORE INTO repo_blobs(repo, digest) VALUES(?,?)", (repo, digest))

    def link_blob(self, repo: str, digest: str) -> int | None:
        """Link an existing blob into a repository (mount); its size, or None if unknown."""
        with self._tx() as db:
            row = db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)).fetchone()
            if row is None:
                return None
            db.execute("INSERT OR IGNORE INTO repo_blobs(repo, digest) VALUES(?,?)", (repo, digest))
            return int(row[0])

    def blob_in_repo(self, repo: str, digest: str) -> int | None:
        row = self.db.execute(
            "SELECT b.size FROM repo_blobs r JOIN blobs b ON b.digest = r.digest "
            "WHERE r.repo=? AND r.digest=?",
            (repo, digest),
        ).fetchone()
        return None if row is None else int(row[0])

    def blob_size(self, digest: str) -> int | None:
        row = self.db.execute("SELECT size FROM blobs WHERE digest=?", (digest,)).fetchone()
        return None if row is None else int(row[0])

    def unlink_blob(self, repo: str, digest: str) -> bool:
        cur = self.db.execute("DELETE FROM repo_blobs WHERE repo=? AND digest=?", (repo, digest))
        return cur.rowcount > 0

    def missing_blobs(self, repo: str, digests: Iterable[str]) -> list[str]:
        return [d for d in digests if self.blob_in_repo(repo, d) is None]

    # --- manifests ----------------------------------------------------------------------------
    def add_manifest(
        self,
        repo: str,
        rec: ManifestRecord,
        *,
        tag: str | None = None,
        pinned: bool = False,
        checked: float | None = None,
        verify_refs: bool = False,
    ) -> ManifestAdded:
        """Add a manifest to a repository (and move ``tag`` to it). ``verify_refs``: only if
        every blob and child manifest it lists is in the repository, checked in the same write
        transaction (no eviction, gc or other process removes one between the check and the
        row); else nothing is written and ``missing`` says what is missing."""
        now = time.time()
        with self._tx() as db:
            if verify_refs:
                missing = self.missing_blobs(repo, rec.blobs)
                missing += self.missing_manifests(repo, rec.children)
                if missing:
                    return ManifestAdded(missing)
            held_pin = db.execute(
                "SELECT r.pinned FROM repo_manifests r JOIN manifests m ON m.digest = r.digest "
                "WHERE r.repo=? AND r.digest=?",
                (repo, rec.digest),
            ).fetchone()
            was = (
                None
                if tag is None
                else db.execute(
                    "SELECT digest, updated, checked FROM tags WHERE repo=? AND tag=?", (repo, tag)
                ).fetchone()
            )
            db.execute(
                "INSERT OR IGNORE INTO manifests(digest, media_type, size, artifact_type, subject, "
                "annotations, created) VALUES(?,?,?,?,?,?,?)",
                (
                    rec.digest,
                    rec.media_type,
                    rec.size,
                    rec.artifact_type,
                    rec.subject,
                    json.dumps(rec.annotations) if rec.annotations else None,
                    now,
                ),
            )
            db.execute(
                "INSERT INTO repo_manifests(repo, digest, created, last_access, pinned) "
                "VALUES(?,?,?,?,?) ON CONFLICT(repo, digest) DO UPDATE SET "
                "pinned = MAX(pinned, excluded.pinned)",
                (repo, rec.digest, now, now, int(pinned)),
            )
            db.executemany(
                "INSERT OR IGNORE INTO manifest_refs(parent, child, kind) VALUES(?,?,?)",
                [(rec.digest, b, "blob") for b in rec.blobs]
                + [(rec.digest, c, "manifest") for c in rec.children],
            )
            if tag is not None:
                order = tag_order(tag)
                db.execute(
                    "INSERT INTO tags(repo, tag, digest, updated, checked, sortkey) "
                    "VALUES(?,?,?,?,?,?) ON CONFLICT(repo, tag) DO UPDATE SET "
                    "digest=excluded.digest, updated=excluded.updated, checked=excluded.checked, "
                    "sortkey=excluded.sortkey",
                    (repo, tag, rec.digest, now, now if checked is None else checked, order),
                )
        was_row = None if was is None else (str(was[0]), float(was[1]), float(was[2]))
        held = held_pin is not None
        return ManifestAdded([], held, tag, was_row, held and pinned and not held_pin[0])

    def manifest_in_repo(self, repo: str, digest: str) -> ManifestRow | None:
        row = self.db.execute(
            f"SELECT {_MANIFEST_COLUMNS} "
            "FROM repo_manifests r JOIN manifests m ON m.digest = r.digest "
            "WHERE r.repo=? AND r.digest=?",
            (repo, digest),
        ).fetchone()
        return _manifest_row(row) if row else None

    def resolve_tag(self, repo: str, tag: str) -> ManifestRow | None:
        row = self.db.execute(
            f"SELECT {_MANIFEST_COLUMNS}, "
            "t.checked FROM tags t JOIN manifests m ON m.digest = t.digest "
            "WHERE t.repo=? AND t.tag=?",
            (repo, tag),
        ).fetchone()
        if not row:
            return None
        r = _manifest_row(row[:6])
        return ManifestRow(
            r.digest, r.media_type, r.size, r.artifact_type, r.subject, r.annotations, row[6]
        )

    def set_tag_checked(self, repo: str, tag: str, checked: float) -> None:
        self.db.execute("UPDATE tags SET checked=? WHERE repo=? AND tag=?", (checked, repo, tag))

    def delete_tag(self, repo: str, tag: str) -> bool:
        cur = self.db.execute("DELETE FROM tags WHERE repo=? AND tag=?", (repo, tag))
        return cur.rowcount > 0

    def delete_manifest(self, repo: str, digest: str) -> bool:
        with self._tx() as db:
            cur = db.execute("DELETE FROM repo_manifests WHERE repo=? AND digest=?", (repo, digest))
            db.execute("DELETE FROM tags WHERE repo=? AND digest=?", (repo, digest))
            return bool(cur.rowcount > 0)

    def list_tags(self, repo: str, n: int | None, last: str | None) -> list[str]:
        q = "SELECT tag FROM tags WHERE repo=? AND tag > ? ORDER BY tag"
        args: list[Any] = [repo, last or ""]
        if n is not None:
            q += " LIMIT ?"
            args.append(n)
        return [r[0] for r in self.db.execute(q, args)]

    def referrers(self, repo: str, subject: str) -> list[ManifestRow]:
        rows = self.db.execute(
            f"SELECT {_MANIFEST_COLUMNS} "
            "FROM manifests m JOIN repo_manifests r ON r.digest = m.digest "
            "WHERE m.subject=? AND r.repo=? ORDER BY m.digest",
            (subject, repo),
        ).fetchall()
        return [_manifest_row(r) for r in rows]

    def missing_manifests(self, repo: str, digests: Iterable[str]) -> list[str]:
        return [d for d in digests if self.manifest_in_repo(repo, d) is None]

    # --- access times -----------------------------------------------------------------------------
    def touch(self, items: Iterable[tuple[str, str, float]]) -> None:
        """Record accesses, in one transaction (the registry batches them). A manifest's access
        is also its unit's (see regproxy.evict_batch): the index of the repository listing it
        and the subject it refers to are touched too, so eviction orders units by their use."""
        with self._tx() as db:
            for repo, digest, t in items:
                cur = db.execute(
                    "UPDATE repo_manifests SET last_access=? WHERE repo=? AND digest=?",
                    (t, repo, digest),
                )
                if cur.rowcount:
                    db.execute(
                        "UPDATE repo_manifests SET last_access = max(last_access, :t) "
                        "WHERE repo = :repo AND (digest IN (SELECT parent FROM manifest_refs "
                        " WHERE child = :d AND kind = 'manifest') "
                        " OR digest = (SELECT subject FROM manifests WHERE digest = :d))",
                        {"t": t, "repo": repo, "d": digest},
                    )
                else:
                    db.execute("UPDATE blobs SET last_access=? WHERE digest=?", (t, digest))
                db.execute("UPDATE repos SET last_access=? WHERE name=?", (t, repo))

    # --- uploads ----------------------------------------------------------------------------------
    def add_upload(self, uid: str, repo: str) -> None:
        now = time.time()
        self.db.execute(
            "INSERT INTO uploads(uuid, repo, started, updated) VALUES(?,?,?,?)",
            (uid, repo, now, now),
        )

    def remove_upload(self, uid: str) -> None:
        self.db.execute("DELETE FROM uploads WHERE uuid=?", (uid,))

    def clear_uploads(self) -> int:
        return int(self.db.execute("DELETE FROM uploads").rowcount)

    # --- eviction, gc, fsck (regproxy.evict, regproxy.maintenance) -------------------------------
    def transaction(self) -> Any:
        """``with index.transaction():`` one write transaction around several calls below."""
        return self._tx()

    def totals(self) -> Totals:
        """What the store holds (one row, kept by the schema's triggers: no scan)."""
        row = self.db.execute(f"SELECT {', '.join(schema.TOTALS_COLUMNS)} FROM totals").fetchone()
        return Totals(*(int(v) for v in row))

    def store_bytes(self) -> int:
        """Bytes of every blob and manifest file the index knows (each digest counted once)."""
        return int(self.db.execute("SELECT stored_bytes FROM totals").fetchone()[0])

    def manifest_users(self, digest: str) -> list[tuple[str, str]]:
        """(repo, manifest digest) of every repository manifest that references ``digest``."""
        return [
            (r, d)
            for r, d in self.db.execute(
                "SELECT rm.repo, rm.digest FROM manifest_refs mr "
                "JOIN repo_manifests rm ON rm.digest = mr.parent WHERE mr.child=? "
                "ORDER BY rm.repo, rm.digest",
                (digest,),
            )
        ]

    def uploads_before(self, before: float) -> list[tuple[str, str]]:
        """(uuid, repo) of upload sessions not written to since ``before``."""
        return [
            (u, r)
            for u, r in self.db.execute(
                "SELECT uuid, repo FROM uploads WHERE updated < ?", (before,)
            )
        ]

    def upload_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT uuid FROM uploads")}

    def pinned_bytes(self) -> int:
        """Bytes reachable from pinned repository manifests (an index's children included)."""
        return int(self.db.execute("SELECT pinned_bytes FROM totals").fetchone()[0])

    def is_stored(self, digest: str) -> bool:
        """A blobs or manifests row names the digest (its file belongs to the store)."""
        row = self.db.execute("SELECT size FROM refs WHERE digest=?", (digest,)).fetchone()
        return row is not None and row[0] is not None

    def stored_among(self, digests: Sequence[str]) -> set[str]:
        """Which of these digests the index stores (one query for all of them)."""
        return {
            r[0]
            for r in self.db.execute(
                "SELECT digest FROM refs WHERE digest IN (SELECT value FROM json_each(?)) "
                "AND size IS NOT NULL",
                (json.dumps(list(digests)),),
            )
        }

    def recount(self) -> Totals:
        """:meth:`totals` counted again from every row (a full pass: fsck and tests)."""
        sums = schema.recount(self.db)
        return Totals(*(sums[c] for c in schema.TOTALS_COLUMNS))

    def data_version(self) -> int:
        """Changes when another connection (gc, fsck, import) committed to the database."""
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    # --- pins (regproxy.pins, regproxy.prefetch) ---------------------------------------------------
    def pin_manifests(self, repo: str, digests: Sequence[str], pinned: bool) -> int:
        """Set or clear the pin of manifests held in a repository; how many rows changed."""
        with self._tx() as db:
            n = 0
            for d in digests:
                cur = db.execute(
                    "UPDATE repo_manifests SET pinned=? WHERE repo=? AND digest=? AND pinned<>?",
                    (int(pinned), repo, d, int(pinned)),
                )
                n += cur.rowcount
            return n

    def manifest_children(self, digest: str) -> list[str]:
        return [
            r[0]
            for r in self.db.execute(
                "SELECT child FROM manifest_refs WHERE parent=? AND kind='manifest' ORDER BY child",
                (digest,),
            )
        ]

    def pinned_parents(self, repo: str, digest: str) -> list[str]:
        """Pinned manifests of the repository that list ``digest`` as a child."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT x.parent FROM manifest_refs x JOIN repo_manifests r "
                "ON r.digest = x.parent AND r.repo=? AND r.pinned=1 "
                "WHERE x.child=? AND x.kind='manifest'",
                (repo, digest),
            )
        ]

    def index_parents(self, repo: str, digest: str, limit: int = 16) -> list[str]:
        """Manifests of the repository that list ``digest`` as a child (its indexes)."""
        return [
            r[0]
            for r in self.db.execute(
                "SELECT x.parent FROM manifest_refs x JOIN repo_manifests r "
                "ON r.digest = x.parent AND r.repo=? "
                "WHERE x.child=? AND x.kind='manifest' ORDER BY x.parent LIMIT ?",
                (repo, digest, limit),
            )
        ]

    def list_pins(
        self,
        repo: str | None = None,
        *,
        after: tuple[str, str] = ("", ""),
        limit: int | None = None,
    ) -> list[PinRow]:
        """Pinned manifests (of one repository, or all) by (repo, digest) after ``after``, a
        keyset page of ``limit`` rows, each with its tags and blob bytes."""
        q = (
            "SELECT r.repo, r.digest, m.media_type, m.size, "
            "(SELECT group_concat(t.tag, ',') FROM tags t "
            " WHERE t.repo = r.repo AND t.digest = r.digest), "
            "(SELECT COALESCE(SUM(b.size), 0) FROM manifest_refs x "
            " JOIN blobs b ON b.digest = x.child WHERE x.parent = r.digest AND x.kind='blob') "
            "FROM repo_manifests r INDEXED BY repo_manifests_pinned "
            "JOIN manifests m ON m.digest = r.digest "
            "WHERE r.pinned <> 0 AND (r.repo, r.digest) > (?, ?)"
        )
        args: list[Any] = list(after)
        if repo is not None:
            q += " AND r.repo=?"
            args.append(repo)
        q += " ORDER BY r.repo, r.digest"
        if limit is not None:
            q += " LIMIT ?"
            args.append(limit)
        return [
            PinRow(
                row[0],
                row[1],
                row[2],
                int(row[3]),
                sorted(row[4].split(",")) if row[4] else [],
                int(row[5]),
            )
            for row in self.db.execute(q, args)
        ]


class _Transaction:
    """``BEGIN IMMEDIATE`` .. ``COMMIT``; inside a transaction already, it joins that one (so
    several calls that each write in a transaction can be grouped into one). While it holds
    the write lock, the index's :attr:`Index.locked_version` says so."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self.db = index.db
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        if not self.db.in_transaction:
            self.index.busy.acquire()
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    self.index.locked_version = self.index.data_version()
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
            except BaseException:
                self.index.busy.release()
                raise
            self.outer = True
        return self.db

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self.outer:
            return
        # cleared before the lock goes: another process may commit as soon as it has
        self.index.locked_version = None
        # SQLite may have rolled back already (a full disk does that): never leave a transaction
        # open on the one connection, nor hide the first error behind "no transaction is active"
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
        finally:
            try:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
            finally:
                self.index.busy.release()


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one function on the index; a full disk (SQLite's ``SQLITE_FULL``, or ``ENOSPC``/
    ``EDQUOT`` from a file it writes) is raised as :class:`StorageFull`, which the API answers
    with 507. :class:`~regproxy.async_index.AsyncIndex` runs every write through it."""
    try:
        return fn(*args, **kwargs)
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_FULL:
            raise
        raise StorageFull(f"the metadata index could not be written: {exc}") from exc
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise StorageFull(f"the metadata index could not be written: {exc.strerror}") from exc


#: below this much free space an index that fails to open is taken to have failed for room
OPEN_ROOM: Final = 1 << 20


def _no_room(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < OPEN_ROOM


def _manifest_row(row: Sequence[Any]) -> ManifestRow:
    ann = json.loads(row[5]) if row[5] else None
    return ManifestRow(row[0], row[1], int(row[2]), row[3], row[4], ann)
