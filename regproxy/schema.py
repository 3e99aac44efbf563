"""The index's schema: its versions, the ordered migrations between them, and the connection
every user of the index opens (the daemon's writer and readers, gc, fsck, import).

The version lives in SQLite's ``PRAGMA user_version``. A store written before versioning has
``user_version`` 0 and the tables of version 1 (:data:`V1`, kept verbatim so that stores made
by that code can be recognised and tested); a new store starts as version 1 too, so every store
goes through the same migrations. Opening a store with an older schema upgrades it in place, in
one transaction (a crash leaves the old schema); a store written by a newer release (a higher
``user_version``) is refused with :class:`IndexVersionError`, one line naming both versions.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from regproxy.errors import RegproxyError

log = logging.getLogger("regproxy.index")

#: the schema version this code writes
SCHEMA_VERSION: Final = 2

#: version 1: the schema of every store written before versioning (user_version 0)
V1: Final = (
    "CREATE TABLE IF NOT EXISTS repos("
    " name TEXT PRIMARY KEY, host TEXT, path TEXT, created REAL NOT NULL, last_access REAL)",
    "CREATE TABLE IF NOT EXISTS blobs("
    " digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL, last_access REAL)",
    "CREATE TABLE IF NOT EXISTS repo_blobs("
    " repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY(repo, digest)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS repo_blobs_digest ON repo_blobs(digest)",
    "CREATE TABLE IF NOT EXISTS manifests("
    " digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL,"
    " artifact_type TEXT, subject TEXT, annotations TEXT, created REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS manifests_subject ON manifests(subject)",
    "CREATE TABLE IF NOT EXISTS repo_manifests("
    " repo TEXT NOT NULL, digest TEXT NOT NULL, created REAL NOT NULL, last_access REAL,"
    " pinned INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(repo, digest)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS repo_manifests_digest ON repo_manifests(digest)",
    "CREATE TABLE IF NOT EXISTS manifest_refs("
    " parent TEXT NOT NULL, child TEXT NOT NULL, kind TEXT NOT NULL,"
    " PRIMARY KEY(parent, child)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs(child)",
    "CREATE TABLE IF NOT EXISTS tags("
    " repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,"
    " updated REAL NOT NULL, checked REAL NOT NULL, PRIMARY KEY(repo, tag)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS tags_digest ON tags(repo, digest)",
    "CREATE TABLE IF NOT EXISTS uploads("
    " uuid TEXT PRIMARY KEY, repo TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL)",
)


class IndexVersionError(RegproxyError):
    """The index was written by a newer release (or is not an index at all)."""

    def __init__(self, path: Path, found: int) -> None:
        super().__init__(path, found)
        self.path = path
        self.found = found

    def __str__(self) -> str:
        return (
            f"index {self.path} has schema version {self.found}, newer than the {SCHEMA_VERSION} "
            "this regproxy knows: it was written by a newer release; run that release "
            "(or move the store aside to start empty)"
        )


def _v2(db: sqlite3.Connection) -> None:
    """Tags by digest (evicting a manifest deletes its tags; a scan per manifest before), and an
    access time on every row (eviction orders by it)."""
    db.execute("DROP INDEX IF EXISTS tags_digest")
    db.execute("CREATE INDEX tags_by_digest ON tags(digest, repo)")
    db.execute("UPDATE repo_manifests SET last_access = created WHERE last_access IS NULL")
    db.execute("UPDATE blobs SET last_access = created WHERE last_access IS NULL")


#: (version it brings the schema to, what it does), in order; append, never edit a released one
MIGRATIONS: Final[tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...]] = ((2, _v2),)


def user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _has_tables(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='repos'").fetchone()
    return row is not None


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION` in one transaction; the version found."""
    found = user_version(db)
    if found > SCHEMA_VERSION:
        raise IndexVersionError(path, found)
    if found == SCHEMA_VERSION:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        found = user_version(db)  # another process may have migrated meanwhile
        if found > SCHEMA_VERSION:
            raise IndexVersionError(path, found)
        version = found
        if version == 0:
            fresh = not _has_tables(db)
            for stmt in V1:
                db.execute(stmt)
            version = 1
            if not fresh:
                log.info("index.upgrade path=%s from=unversioned", path)
        started = time.monotonic()
        for to, step in MIGRATIONS:
            if to > version:
                step(db)
                version = to
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    if found:
        log.info(
            "index.upgraded path=%s from=%d to=%d seconds=%.2f",
            path,
            found,
            SCHEMA_VERSION,
            time.monotonic() - started,
        )
    return found


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the index's settings; the writer also migrates the schema.

    Readers (``readonly``) run beside the writer in WAL mode and never wait for it; they refuse
    to write (``query_only``) and to read a schema they do not know.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        if readonly:
            db.execute("PRAGMA query_only=1")
            found = user_version(db)
            if found > SCHEMA_VERSION:
                raise IndexVersionError(path, found)
            return db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        migrate(db, path)
    except BaseException:
        db.close()
        raise
    return db
