"""The index's schema: its versions, the ordered migrations between them, and the connection
every user of the index opens (the daemon's writer and readers, gc, fsck, import).

The version lives in SQLite's ``PRAGMA user_version``. A store written before versioning has
``user_version`` 0 and the tables of version 1 (:data:`V1`, kept verbatim so that stores made
by that code can be recognised and tested); a new store starts as version 1 too, so every store
goes through the same migrations. Opening a store with an older schema upgrades it in place, in
one transaction (a crash leaves the old schema); a store written by a newer release (a higher
``user_version``) is refused with :class:`IndexVersionError`, one line naming both versions.

Commands that only read (plain ``fsck``, ``gc --dry-run``, ``pins``) never migrate nor create:
they open readers only (:func:`require_current`), and an older schema is
:class:`IndexOutdated`, a missing index :class:`IndexMissing`. An upgrade that recounts (from a
schema before version 3: a full pass, tens of seconds at a million blobs) logs
``index.migrating`` first and keeps telling systemd that the start is alive
(``EXTEND_TIMEOUT_USEC``, see :class:`_StartExtender`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Final

from regproxy.errors import RegproxyError
from regproxy.start_extender import EXTEND_STEPS, StartExtender
from regproxy.tag_order import tag_order

log = logging.getLogger("regproxy.index")

#: the writer's page cache: the pages an eviction batch or a burst of commits rewrites
WRITER_CACHE_KIB: Final = 16 * 1024
#: the schema version this code writes
SCHEMA_VERSION: Final = 10

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


#: what the index's database raises when its file is damaged or its disk fails (for callers
#: above the index that report it and do not import sqlite3)
IndexDatabaseError: Final = sqlite3.Error


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


class IndexOutdated(IndexVersionError):
    """A command that only reads found an index of an older schema: it does not upgrade it."""

    def __str__(self) -> str:
        return (
            f"index {self.path} has schema version {self.found}, older than the {SCHEMA_VERSION} "
            "this regproxy writes, and this command only reads: upgrade it first (start the "
            "daemon, or run `regproxy gc` or `regproxy fsck --repair`)"
        )


class IndexMissing(RegproxyError):
    """A command that only reads (or, as ``export`` without sync, has nothing to fill a new
    store with: ``why``) found no index (a wrong ``storage.root``, an empty store)."""

    def __init__(self, path: Path, why: str = "this command only reads") -> None:
        super().__init__(path, why)
        self.path = path
        self.why = why

    def __str__(self) -> str:
        return (
            f"no index at {self.path}: {self.path.parent} is not a regproxy store (check "
            f"storage.root); {self.why} and created nothing"
        )


def _v2(db: sqlite3.Connection) -> None:
    """Tags by digest (evicting a manifest deletes its tags; a scan per manifest before), and an
    access time on every row (eviction orders by it)."""
    db.execute("DROP INDEX IF EXISTS tags_digest")
    db.execute("CREATE INDEX tags_by_digest ON tags(digest, repo)")
    db.execute("UPDATE repo_manifests SET last_access = created WHERE last_access IS NULL")
    db.execute("UPDATE blobs SET last_access = created WHERE last_access IS NULL")


# --- version 3: running totals and reference counts, kept by triggers -----------------------------
#
# ``refs`` has a row for every digest that is stored (a blobs or manifests row: ``size``) or that
# something still references:
#
#   live(d)   = repository rows (repo_manifests) naming d + live manifests listing d
#   pinned(d) = pinned repository rows naming d + pinned manifests listing d   (pinned <= live)
#
# A manifest "listing" d is a manifest_refs row (an index's children, a manifest's config and
# layers). When live (or pinned) of a manifest crosses zero, its children's counts change by one:
# the triggers cascade (``PRAGMA recursive_triggers``, set by :func:`connect`). A stored digest
# with live = 0 is garbage (the partial index ``refs_unreferenced`` finds it at once); a row that
# is neither stored nor referenced is deleted. ``totals`` (one row) sums what the index holds, in
# the same transaction as every change: no query ever sums the index again.

#: what the store holds, as :class:`regproxy.index.Totals` reads it
TOTALS_COLUMNS: Final = (
    "stored_bytes",  # distinct digests with a file (blobs and manifests rows), and their bytes
    "stored_count",
    "pinned_bytes",  # stored digests reachable from a pinned repository row
    "pinned_count",
    "blobs",
    "manifests",
    "tags",
    "repos",  # repositories holding at least one manifest
    "loose_bytes",  # stored digests nothing references (live = 0): gone at eviction or gc
)

_F_NEW = "COALESCE(NEW.size, 0)"
_F_OLD = "COALESCE(OLD.size, 0)"
_PIN_NEW = f"CASE WHEN NEW.pinned > 0 THEN {_F_NEW} ELSE 0 END"
_PIN_OLD = f"CASE WHEN OLD.pinned > 0 THEN {_F_OLD} ELSE 0 END"
_LOOSE_NEW = f"CASE WHEN NEW.live = 0 THEN {_F_NEW} ELSE 0 END"
_LOOSE_OLD = f"CASE WHEN OLD.live = 0 THEN {_F_OLD} ELSE 0 END"
_HELD_NEW = "(NEW.size IS NOT NULL)"
_HELD_OLD = "(OLD.size IS NOT NULL)"

#: name -> body of every trigger of the current schema
TRIGGERS: Final[dict[str, str]] = {
    # files: a digest is stored while a blobs or a manifests row names it
    "blobs_added": "AFTER INSERT ON blobs BEGIN UPDATE totals SET blobs = blobs + 1;"
    " INSERT INTO refs(digest, size) VALUES (NEW.digest, NEW.size)"
    " ON CONFLICT(digest) DO UPDATE SET size = excluded.size WHERE size IS NULL; END",
    "blobs_removed": "AFTER DELETE ON blobs BEGIN UPDATE totals SET blobs = blobs - 1;"
    " UPDATE refs SET size = NULL WHERE digest = OLD.digest"
    " AND NOT EXISTS (SELECT 1 FROM manifests WHERE digest = OLD.digest); END",
    "manifests_added": "AFTER INSERT ON manifests BEGIN UPDATE totals SET manifests = manifests + 1;"
    " INSERT INTO refs(digest, size) VALUES (NEW.digest, NEW.size)"
    " ON CONFLICT(digest) DO UPDATE SET size = excluded.size WHERE size IS NULL; END",
    "manifests_removed": "AFTER DELETE ON manifests BEGIN"
    " UPDATE totals SET manifests = manifests - 1;"
    " UPDATE refs SET size = NULL WHERE digest = OLD.digest"
    " AND NOT EXISTS (SELECT 1 FROM blobs WHERE digest = OLD.digest); END",
    "tags_added": "AFTER INSERT ON tags BEGIN UPDATE totals SET tags = tags + 1; END",
    "tags_removed": "AFTER DELETE ON tags BEGIN UPDATE totals SET tags = tags - 1; END",
    # repository rows: one live (and, pinned, one pinned) reference each
    "rows_added": "AFTER INSERT ON repo_manifests BEGIN"
    " INSERT INTO refs(digest, live, pinned) VALUES (NEW.digest, 1, NEW.pinned <> 0)"
    " ON CONFLICT(digest) DO UPDATE SET live = live + 1, pinned = pinned + excluded.pinned;"
    " UPDATE repos SET manifests = manifests + 1 WHERE name = NEW.repo; END",
    "rows_removed": "AFTER DELETE ON repo_manifests BEGIN"
    " UPDATE refs SET live = live - 1, pinned = pinned - (OLD.pinned <> 0)"
    " WHERE digest = OLD.digest;"
    " UPDATE repos SET manifests = manifests - 1 WHERE name = OLD.repo; END",
    "rows_pinned": "AFTER UPDATE OF pinned ON repo_manifests"
    " WHEN (OLD.pinned <> 0) <> (NEW.pinned <> 0) BEGIN"
    " UPDATE refs SET pinned = pinned + (NEW.pinned <> 0) - (OLD.pinned <> 0)"
    " WHERE digest = NEW.digest; END",
    "repos_held": "AFTER UPDATE OF manifests ON repos"
    " WHEN (OLD.manifests > 0) <> (NEW.manifests > 0) BEGIN"
    " UPDATE totals SET repos = repos + (NEW.manifests > 0) - (OLD.manifests > 0); END",
    # a manifest listing a digest: one reference while the manifest is live (pinned)
    "lists_added": "AFTER INSERT ON manifest_refs BEGIN"
    " INSERT INTO refs(digest, live, pinned)"
    " SELECT NEW.child, 1, p.pinned > 0 FROM refs p WHERE p.digest = NEW.parent AND p.live > 0"
    " ON CONFLICT(digest) DO UPDATE SET live = live + 1, pinned = pinned + excluded.pinned; END",
    "lists_removed": "AFTER DELETE ON manifest_refs BEGIN"
    " UPDATE refs SET live = live - 1,"
    " pinned = pinned - (SELECT p.pinned > 0 FROM refs p WHERE p.digest = OLD.parent)"
    " WHERE digest = OLD.child"
    " AND EXISTS (SELECT 1 FROM refs p WHERE p.digest = OLD.parent AND p.live > 0); END",
    # the cascade: a manifest that becomes (un)referenced (un)references what it lists
    "refs_new_live": "AFTER INSERT ON refs WHEN NEW.live > 0 BEGIN"
    " INSERT INTO refs(digest, live, pinned)"
    " SELECT child, 1, NEW.pinned > 0 FROM manifest_refs WHERE parent = NEW.digest"
    " ON CONFLICT(digest) DO UPDATE SET live = live + 1, pinned = pinned + excluded.pinned; END",
    "refs_live": "AFTER UPDATE OF live ON refs WHEN OLD.live = 0 AND NEW.live > 0 BEGIN"
    " INSERT INTO refs(digest, live) SELECT child, 1 FROM manifest_refs"
    " WHERE parent = NEW.digest ON CONFLICT(digest) DO UPDATE SET live = live + 1; END",
    "refs_dead": "AFTER UPDATE OF live ON refs WHEN OLD.live > 0 AND NEW.live = 0 BEGIN"
    " UPDATE refs SET live = live - 1"
    " WHERE digest IN (SELECT child FROM manifest_refs WHERE parent = NEW.digest); END",
    "refs_pinned": "AFTER UPDATE OF pinned ON refs WHEN OLD.pinned = 0 AND NEW.pinned > 0 BEGIN"
    " UPDATE refs SET pinned = pinned + 1"
    " WHERE digest IN (SELECT child FROM manifest_refs WHERE parent = NEW.digest); END",
    "refs_unpinned": "AFTER UPDATE OF pinned ON refs WHEN OLD.pinned > 0 AND NEW.pinned = 0 BEGIN"
    " UPDATE refs SET pinned = pinned - 1"
    " WHERE digest IN (SELECT child FROM manifest_refs WHERE parent = NEW.digest); END",
    "refs_forgotten": "AFTER UPDATE ON refs"
    " WHEN NEW.live = 0 AND NEW.pinned = 0 AND NEW.size IS NULL BEGIN"
    " DELETE FROM refs WHERE digest = NEW.digest; END",
    # the totals follow every refs row
    "totals_added": "AFTER INSERT ON refs BEGIN UPDATE totals SET"
    f" stored_bytes = stored_bytes + {_F_NEW}, stored_count = stored_count + {_HELD_NEW},"
    f" pinned_bytes = pinned_bytes + {_PIN_NEW}, loose_bytes = loose_bytes + {_LOOSE_NEW},"
    f" pinned_count = pinned_count + (NEW.pinned > 0 AND {_HELD_NEW}); END",
    "totals_removed": "AFTER DELETE ON refs BEGIN UPDATE totals SET"
    f" stored_bytes = stored_bytes - {_F_OLD}, stored_count = stored_count - {_HELD_OLD},"
    f" pinned_bytes = pinned_bytes - {_PIN_OLD}, loose_bytes = loose_bytes - {_LOOSE_OLD},"
    f" pinned_count = pinned_count - (OLD.pinned > 0 AND {_HELD_OLD}); END",
    "totals_changed": "AFTER UPDATE ON refs"
    " WHEN OLD.size IS NOT NEW.size OR (OLD.pinned > 0) <> (NEW.pinned > 0)"
    " OR (OLD.live = 0) <> (NEW.live = 0) BEGIN"
    " UPDATE totals SET"
    f" loose_bytes = loose_bytes + {_LOOSE_NEW} - {_LOOSE_OLD},"
    f" stored_bytes = stored_bytes + {_F_NEW} - {_F_OLD},"
    f" stored_count = stored_count + {_HELD_NEW} - {_HELD_OLD},"
    f" pinned_bytes = pinned_bytes + {_PIN_NEW} - {_PIN_OLD},"
    f" pinned_count = pinned_count + (NEW.pinned > 0 AND {_HELD_NEW})"
    f" - (OLD.pinned > 0 AND {_HELD_OLD}); END",
}


def _v3(db: sqlite3.Connection) -> None:
    db.execute("ALTER TABLE repos ADD COLUMN manifests INTEGER NOT NULL DEFAULT 0")
    db.execute(
        "CREATE TABLE refs(digest TEXT PRIMARY KEY, live INTEGER NOT NULL DEFAULT 0,"
        " pinned INTEGER NOT NULL DEFAULT 0, size INTEGER) WITHOUT ROWID"
    )
    db.execute("CREATE INDEX refs_unreferenced ON refs(digest) WHERE live = 0")
    columns = ", ".join(f"{c} INTEGER NOT NULL DEFAULT 0" for c in TOTALS_COLUMNS)
    db.execute(f"CREATE TABLE totals(id INTEGER PRIMARY KEY CHECK (id = 0), {columns})")
    db.execute("INSERT INTO totals(id) VALUES (0)")
    rebuild_counts(db)


def rebuild_counts(db: sqlite3.Connection) -> None:
    """Compute ``refs``, ``repos.manifests`` and ``totals`` from the rows, and (re)install the
    triggers that keep them (a migration; ``fsck --repair`` after a drift). In a transaction."""
    for name in TRIGGERS:
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
    db.execute("DELETE FROM refs")
    db.execute(
        "UPDATE repos SET manifests = (SELECT count(*) FROM repo_manifests WHERE repo = name)"
    )
    db.execute(
        "INSERT INTO refs(digest, size) SELECT digest, max(size) FROM "
        "(SELECT digest, size FROM blobs UNION ALL SELECT digest, size FROM manifests) "
        "GROUP BY digest"
    )
    for column, rows in (("live", "1"), ("pinned", "pinned <> 0")):
        db.execute(
            f"WITH RECURSIVE s(d) AS (SELECT digest FROM repo_manifests WHERE {rows} "
            "UNION SELECT child FROM manifest_refs JOIN s ON parent = s.d), "
            "uses(d) AS (SELECT digest FROM repo_manifests WHERE "
            f"{rows} UNION ALL SELECT child FROM manifest_refs WHERE parent IN s) "
            f"INSERT INTO refs(digest, {column}) SELECT d, count(*) FROM uses WHERE true "
            f"GROUP BY d ON CONFLICT(digest) DO UPDATE SET {column} = excluded.{column}"
        )
    if _has_column(db, "repos", "size"):
        db.execute("UPDATE repos SET size = NULL")  # counted again (regproxy.repo_sizes)
    sums = recount(db)
    db.execute(
        "UPDATE totals SET " + ", ".join(f"{c} = ?" for c in TOTALS_COLUMNS),
        [sums[c] for c in TOTALS_COLUMNS],
    )
    for name, body in TRIGGERS.items():
        db.execute(f"CREATE TRIGGER {name} {body}")


def recount(db: sqlite3.Connection) -> dict[str, int]:
    """The totals, counted from the rows themselves (a full pass: tests, fsck, migrations)."""
    row = db.execute(
        "WITH RECURSIVE p(d) AS (SELECT digest FROM repo_manifests WHERE pinned <> 0 "
        "UNION SELECT child FROM manifest_refs JOIN p ON parent = p.d), "
        "l(d) AS (SELECT digest FROM repo_manifests "
        "UNION SELECT child FROM manifest_refs JOIN l ON parent = l.d), "
        "stored(digest, size) AS (SELECT digest, max(size) FROM "
        "(SELECT digest, size FROM blobs UNION ALL SELECT digest, size FROM manifests) "
        "GROUP BY digest) "
        "SELECT (SELECT COALESCE(sum(size), 0) FROM stored), (SELECT count(*) FROM stored), "
        "(SELECT COALESCE(sum(size), 0) FROM stored WHERE digest IN p), "
        "(SELECT count(*) FROM stored WHERE digest IN p), "
        "(SELECT count(*) FROM blobs), (SELECT count(*) FROM manifests), "
        "(SELECT count(*) FROM tags), "
        "(SELECT count(*) FROM repos WHERE name IN (SELECT repo FROM repo_manifests)), "
        "(SELECT COALESCE(sum(size), 0) FROM stored WHERE digest NOT IN l)"
    ).fetchone()
    return {c: int(v) for c, v in zip(TOTALS_COLUMNS, row, strict=True)}


def _v4(db: sqlite3.Connection) -> None:
    """Eviction's order: unpinned repository rows by last access (a partial index), so a batch
    reads the least recently used with a LIMIT instead of loading every row."""
    db.execute("UPDATE repo_manifests SET last_access = created WHERE last_access IS NULL")
    db.execute(
        "CREATE INDEX repo_manifests_lru ON repo_manifests(last_access, repo, digest) "
        "WHERE pinned = 0"
    )


def _v5(db: sqlite3.Connection) -> None:
    """Pinned rows by (repo, digest): ``regproxy pins`` pages through them without a scan."""
    db.execute(
        "CREATE INDEX repo_manifests_pinned ON repo_manifests(repo, digest) WHERE pinned <> 0"
    )


# --- version 6: each repository's size, kept as "not known" when it may have changed ------------
#
# ``repos.size``: the bytes a repository's manifests reach that the store holds (the web page's
# size column; regproxy.repo_sizes counts it). A trigger sets it to NULL, "to count again", in
# the transaction of every change that can move it: a repository row added or removed, and a
# digest that something references getting or losing its file (a pull-through blob arriving
# after its manifest, a manifest stored or evicted under an index). The walk up from such a
# digest follows the manifests that list it :data:`SIZE_WALK_UP` levels up (an index may list
# indexes, and each level may be another repository's row), by joins: SQLite documents a WITH
# clause in a trigger as not supported (a nested one parses on recent releases only by
# accident), and a trigger that fails to parse would stop every start-up at the upgrade.
# Digests nothing references (live = 0: eviction's and gc's deletions) cost no walk.

#: manifests above a digest whose repositories' sizes its file changes: a blob, its image
#: manifest, an index and three more indexes above it (OCI sets no limit; nothing nests so deep)
SIZE_WALK_UP: Final = 5


def _repos_above(levels: int) -> str:
    """The repositories with a row for NEW.digest or a manifest up to ``levels`` above it."""
    parts = ["SELECT repo FROM repo_manifests WHERE digest = NEW.digest"]
    for n in range(1, levels + 1):
        joins = " ".join(
            f"JOIN manifest_refs x{i} ON x{i}.child = x{i - 1}.parent" for i in range(2, n + 1)
        )
        parts.append(
            f"SELECT r.repo FROM manifest_refs x1 {joins} JOIN repo_manifests r"
            f" ON r.digest = x{n}.parent WHERE x1.child = NEW.digest".replace("  ", " ")
        )
    return " UNION ".join(parts)


#: name -> body of the triggers that forget a repository's size
SIZE_TRIGGERS: Final[dict[str, str]] = {
    "size_rows_added": "AFTER INSERT ON repo_manifests BEGIN"
    " UPDATE repos SET size = NULL WHERE name = NEW.repo AND size IS NOT NULL; END",
    "size_rows_removed": "AFTER DELETE ON repo_manifests BEGIN"
    " UPDATE repos SET size = NULL WHERE name = OLD.repo AND size IS NOT NULL; END",
    "size_stored": "AFTER UPDATE OF size ON refs"
    " WHEN OLD.size IS NOT NEW.size AND (OLD.live > 0 OR NEW.live > 0) BEGIN"
    " UPDATE repos SET size = NULL WHERE size IS NOT NULL AND name IN ("
    + _repos_above(SIZE_WALK_UP)
    + "); END",
}


def _v6(db: sqlite3.Connection) -> None:
    """Each repository's size, counted once and kept until something changes it."""
    db.execute("ALTER TABLE repos ADD COLUMN size INTEGER")
    db.execute("CREATE INDEX repos_unsized ON repos(name) WHERE size IS NULL")
    for name, body in SIZE_TRIGGERS.items():
        db.execute(f"CREATE TRIGGER {name} {body}")


def _v7(db: sqlite3.Connection) -> None:
    """The size trigger walks further up (version 6's went two manifests up: a blob under
    an index of indexes left the top repository's kept size stale), and every size kept by
    version 6 is counted again."""
    db.execute("DROP TRIGGER IF EXISTS size_stored")
    db.execute(f"CREATE TRIGGER size_stored {SIZE_TRIGGERS['size_stored']}")
    db.execute("UPDATE repos SET size = NULL")


def _has_column(db: sqlite3.Connection, table: str, column: str) -> bool:
    return any(r[1] == column for r in db.execute(f"PRAGMA table_info({table})"))


def _v8(db: sqlite3.Connection) -> None:
    """The bytes nothing references (the overview's "unreferenced") kept in ``totals``: the
    page summed them over every such digest, half a million after a large delete."""
    if not _has_column(db, "totals", "loose_bytes"):  # a store from before v3 has it already
        db.execute("ALTER TABLE totals ADD COLUMN loose_bytes INTEGER NOT NULL DEFAULT 0")
    for name in ("totals_added", "totals_removed", "totals_changed"):
        db.execute(f"DROP TRIGGER IF EXISTS {name}")
        db.execute(f"CREATE TRIGGER {name} {TRIGGERS[name]}")
    db.execute(
        "UPDATE totals SET loose_bytes = (SELECT COALESCE(SUM(size), 0) FROM refs "
        "WHERE live = 0 AND size IS NOT NULL)"
    )


# --- version 9: a repository's tags in the web page's orders, each read by an index ------------
def _v9(db: sqlite3.Connection) -> None:
    """The web page's tag list pages by key in each of its orders: by name (numbers as
    numbers, ``sortkey``), by when the tag moved, by when the repository got the manifest and
    by last pull (the last two walk the repository's rows in that order and their tags)."""
    if not _has_column(db, "tags", "sortkey"):
        db.execute("ALTER TABLE tags ADD COLUMN sortkey BLOB")
    db.create_function("regproxy_tag_order", 1, tag_order, deterministic=True)
    try:
        db.execute("UPDATE tags SET sortkey = regproxy_tag_order(tag)")
    finally:
        db.create_function("regproxy_tag_order", 1, None)
    db.execute("CREATE INDEX IF NOT EXISTS tags_by_name ON tags(repo, sortkey, tag)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS tags_by_updated ON tags(repo, updated DESC, sortkey, tag)"
    )
    db.execute("CREATE INDEX IF NOT EXISTS repo_manifests_created ON repo_manifests(repo, created)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS repo_manifests_pulled ON repo_manifests(repo, last_access) "
        "WHERE last_access > created"
    )


def _v10(db: sqlite3.Connection) -> None:
    """Tag rows without a sort key (written by a daemon of version 8 or older after a newer
    tool upgraded its store beside it) found without a scan, for :func:`sort_new_tags`."""
    db.execute("CREATE INDEX IF NOT EXISTS tags_unsorted ON tags(repo) WHERE sortkey IS NULL")


def sort_new_tags(db: sqlite3.Connection) -> int:
    """Give the tag rows without a sort key theirs (see :func:`_v10`; each writer's connection,
    once migrated): such a row would drop out of the web page's keyset pages. Returns how many."""
    db.create_function("regproxy_tag_order", 1, tag_order, deterministic=True)
    try:
        return db.execute(
            "UPDATE tags INDEXED BY tags_unsorted SET sortkey = regproxy_tag_order(tag) "
            "WHERE sortkey IS NULL"
        ).rowcount
    finally:
        db.create_function("regproxy_tag_order", 1, None)


#: (version it brings the schema to, what it does), in order; append, never edit a released one
MIGRATIONS: Final[tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...]] = (
    (2, _v2),
    (3, _v3),
    (4, _v4),
    (5, _v5),
    (6, _v6),
    (7, _v7),
    (8, _v8),
    (9, _v9),
    (10, _v10),
)


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
        # a store that has rows (not a new one, not one another process just upgraded)
        upgrading = SCHEMA_VERSION > found > 0 or (found == 0 and _has_tables(db))
        if version == 0:
            for stmt in V1:
                db.execute(stmt)
            version = 1
            if upgrading:
                log.info("index.upgrade path=%s from=unversioned", path)
        started = time.monotonic()
        if upgrading:
            log.info(
                "index.migrating path=%s from=%d to=%d recount=%s",
                path,
                found,
                SCHEMA_VERSION,
                "yes" if found < 3 else "no",  # version 3's counts: a pass over every row
            )
            extender = StartExtender(f"upgrading the index from schema {found} to {SCHEMA_VERSION}")
            extender()
            db.set_progress_handler(extender, EXTEND_STEPS)
        for to, step in MIGRATIONS:
            if to > version:
                step(db)
                version = to
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    finally:
        db.set_progress_handler(None, 0)
    if upgrading:
        log.info(
            "index.upgraded path=%s from=%d to=%d seconds=%.2f",
            path,
            found,
            SCHEMA_VERSION,
            time.monotonic() - started,
        )
    return found


def require_current(db: sqlite3.Connection, path: Path) -> None:
    """For a command that only reads: the index must have this release's schema (it is not
    upgraded here; :class:`IndexOutdated` says how)."""
    found = user_version(db)
    if found > SCHEMA_VERSION:
        raise IndexVersionError(path, found)
    if found == 0 and not _has_tables(db):
        raise IndexMissing(path)  # an empty file: nothing was ever written to it
    if found < SCHEMA_VERSION:
        raise IndexOutdated(path, found)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the index's settings; the writer also migrates the schema.

    Readers (``readonly``) run beside the writer in WAL mode and never wait for it; they refuse
    to write (``query_only``) and to read a schema they do not know, and never create the file
    (:class:`IndexMissing`).
    """
    if readonly:
        if not path.exists():
            raise IndexMissing(path)
        uri = f"file:{urllib.parse.quote(str(path))}?mode=rw"  # never creates it
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA busy_timeout=10000")
        # statement and savepoint journals (every statement that fires a trigger has one) in
        # memory, not in a temp file: an eviction batch wrote each page twice otherwise
        db.execute("PRAGMA temp_store=MEMORY")
        if readonly:
            db.execute("PRAGMA query_only=1")
            found = user_version(db)
            if found > SCHEMA_VERSION:
                raise IndexVersionError(path, found)
            return db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA recursive_triggers=ON")  # the reference counts cascade
        db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        migrate(db, path)
        if sorted_now := sort_new_tags(db):
            log.info("index.tags_sorted path=%s rows=%d", path, sorted_now)
    except BaseException:
        db.close()
        raise
    return db
