"""Schema versions: a store written before versioning is upgraded in place, a newer one refused."""

from __future__ import annotations

import logging
import socket
import sqlite3
import tempfile
from pathlib import Path

import pytest
import yaml

from regproxy import cli, schema, start_extender
from regproxy.async_index import AsyncIndex
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.registry import LocalRegistry
from regproxy.store import Store

#: the index schema of every release before versioning, verbatim (user_version 0): a fixture,
#: deliberately not imported from regproxy.schema
V1_DDL = """
CREATE TABLE IF NOT EXISTS repos(
  name TEXT PRIMARY KEY, host TEXT, path TEXT, created REAL NOT NULL, last_access REAL);
CREATE TABLE IF NOT EXISTS blobs(
  digest TEXT PRIMARY KEY, size INTEGER NOT NULL, created REAL NOT NULL, last_access REAL);
CREATE TABLE IF NOT EXISTS repo_blobs(
  repo TEXT NOT NULL, digest TEXT NOT NULL, PRIMARY KEY(repo, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repo_blobs_digest ON repo_blobs(digest);
CREATE TABLE IF NOT EXISTS manifests(
  digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL,
  artifact_type TEXT, subject TEXT, annotations TEXT, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS manifests_subject ON manifests(subject);
CREATE TABLE IF NOT EXISTS repo_manifests(
  repo TEXT NOT NULL, digest TEXT NOT NULL, created REAL NOT NULL, last_access REAL,
  pinned INTEGER NOT NULL DEFAULT 0, PRIMARY KEY(repo, digest)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS repo_manifests_digest ON repo_manifests(digest);
CREATE TABLE IF NOT EXISTS manifest_refs(
  parent TEXT NOT NULL, child TEXT NOT NULL, kind TEXT NOT NULL,
  PRIMARY KEY(parent, child)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs(child);
CREATE TABLE IF NOT EXISTS tags(
  repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
  updated REAL NOT NULL, checked REAL NOT NULL, PRIMARY KEY(repo, tag)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tags_digest ON tags(repo, digest);
CREATE TABLE IF NOT EXISTS uploads(
  uuid TEXT PRIMARY KEY, repo TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL);
"""

REPO = "spectro-images/docker.io/library/app"
PUSHED = "spectro-images/mine/pushed"
M1, M2, IDX = (f"sha256:{c * 64}" for c in "abc")
L1, L2, L3 = (f"sha256:{c * 64}" for c in "def")


def v1_store(root: Path) -> Path:
    """A store as the unversioned release wrote it: an image pulled through, an index with one
    child held by a pushed (pinned) repository, a loose blob, a pending upload."""
    Store(root).open()
    path = root / "index.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_DDL)
    db.execute("BEGIN")
    for name, host, p in ((REPO, "docker.io", "library/app"), (PUSHED, None, "mine/pushed")):
        db.execute("INSERT INTO repos VALUES(?,?,?,?,?)", (name, host, p, 100.0, None))
    for d, size in ((L1, 1000), (L2, 2000), (L3, 3000), (M1, 300)):
        db.execute("INSERT INTO blobs VALUES(?,?,?,?)", (d, size, 100.0, None))
    db.executemany("INSERT INTO repo_blobs VALUES(?,?)", [(REPO, L1), (REPO, L2), (PUSHED, L3)])
    oci = "application/vnd.oci.image.manifest.v1+json"
    for d, mt, size in ((M1, oci, 300), (M2, oci, 400), (IDX, "application/x-index", 200)):
        db.execute(
            "INSERT INTO manifests VALUES(?,?,?,?,?,?,?)", (d, mt, size, None, None, None, 100.0)
        )
    db.executemany(
        "INSERT INTO repo_manifests VALUES(?,?,?,?,?)",
        [(REPO, M1, 100.0, 150.0, 0), (PUSHED, IDX, 100.0, None, 1), (PUSHED, M2, 100.0, None, 1)],
    )
    db.executemany(
        "INSERT INTO manifest_refs VALUES(?,?,?)",
        [(M1, L1, "blob"), (M1, L2, "blob"), (IDX, M2, "manifest"), (M2, L2, "blob")],
    )
    db.executemany(
        "INSERT INTO tags VALUES(?,?,?,?,?)",
        [(REPO, "v1", M1, 100.0, 120.0), (PUSHED, "latest", IDX, 100.0, 100.0)],
    )
    db.execute("INSERT INTO uploads VALUES('u1', ?, 100.0, 100.0)", (PUSHED,))
    db.execute("COMMIT")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()
    return path


async def test_a_store_from_before_versioning_is_upgraded_in_place(tmp_path: Path) -> None:
    root = tmp_path / "store"
    path = v1_store(root)
    reg = LocalRegistry(Store(root), AsyncIndex(path))
    await reg.open(sweep=False)
    try:
        found = await reg.db.read(Index.resolve_tag, REPO, "v1")
        assert found is not None and found.digest == M1 and found.checked == 120.0
        assert await reg.catalog(None, None) == [REPO, PUSHED]
        assert await reg.db.read(Index.list_tags, PUSHED, None, None) == ["latest"]
        pins = await reg.db.read(Index.list_pins, None)
        assert {(p.repo, p.digest) for p in pins} == {(PUSHED, IDX), (PUSHED, M2)}
        assert await reg.db.read(Index.blob_in_repo, REPO, L2) == 2000
        assert await reg.db.read(Index.upload_ids) == {"u1"}
        # the running totals start from what the old rows hold, equal to a full recount
        totals = await reg.db.read(Index.totals)
        assert totals == await reg.db.read(Index.recount)
        # every file once (M1 is a blob row too); pinned: the index, its child and its layer;
        # loose: the pushed layer no manifest lists
        assert (totals.stored_bytes, totals.stored_count, totals.manifests) == (6900, 6, 3)
        assert (totals.pinned_bytes, totals.loose_bytes) == (200 + 400 + 2000, 3000)
        # and it takes writes in the new schema
        await reg.db.write(Index.ensure_repo, "spectro-images/new", None, "new")
        assert await reg.repo_exists(RepoName("spectro-images/new"))
        assert await reg.db.read(Index.totals) == await reg.db.read(Index.recount)
    finally:
        await reg.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "tags_by_digest" in indexes and "tags_digest" not in indexes
        plan = " ".join(
            str(r) for r in db.execute("EXPLAIN QUERY PLAN DELETE FROM tags WHERE digest=?", (M1,))
        )
        assert "tags_by_digest" in plan, plan  # no scan of every tag per evicted manifest
        nulls = db.execute(
            "SELECT (SELECT count(*) FROM repo_manifests WHERE last_access IS NULL) + "
            "(SELECT count(*) FROM blobs WHERE last_access IS NULL)"
        ).fetchone()[0]
        assert nulls == 0
    finally:
        db.close()
    # opening again is a no-op: the version is current
    ix = Index(path)
    ix.open()
    assert schema.user_version(ix.db) == schema.SCHEMA_VERSION
    ix.close()


def test_a_new_store_has_the_current_schema(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.db")
    ix.open()
    try:
        assert schema.user_version(ix.db) == schema.SCHEMA_VERSION
        ix.ensure_repo("spectro-images/x", None, "x")
        assert ix.repo_exists("spectro-images/x")
    finally:
        ix.close()


def test_a_store_from_a_newer_release_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    path = v1_store(root)
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION + 7}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(schema.IndexVersionError):
        Index(path).open()
    conf = tmp_path / "regproxy.yaml"
    conf.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "listen": "127.0.0.1:0"}))
    for command in ("gc", "serve"):
        capsys.readouterr()
        assert cli.main(["--config", str(conf), command]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        want = f"schema version {schema.SCHEMA_VERSION + 7}, newer than the"
        assert len(err) == 1 and want in err[0] and "newer release" in err[0], err
    assert path.read_bytes() == before  # untouched


#: every command that opens a store, with what it needs to get that far
OPENS_A_STORE = (
    ["serve"],
    ["gc"],
    ["gc", "--dry-run"],
    ["fsck"],
    ["fsck", "--repair"],
    ["pins"],
    ["pin", "docker.io/library/app:v1"],
    ["prefetch", "docker.io/library/app:v1"],
    ["export", "-o", "out.tar", "docker.io/library/app:v1"],
    ["import", "in.tar"],
)


def test_a_store_of_another_layout_is_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A store whose ``LAYOUT_VERSION`` this regproxy does not know (a newer release laid it
    out) stops the daemon and every command that opens it with one line naming it, exit 2 (no
    traceback), and nothing in it changes."""
    root = tmp_path / "store"
    v1_store(root)
    (root / "LAYOUT_VERSION").write_text("2\n")
    conf = tmp_path / "regproxy.yaml"
    conf.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "listen": "127.0.0.1:0"}))
    before = files(root)
    for command in OPENS_A_STORE:
        capsys.readouterr()
        code = cli.main(["--config", str(conf), *command])
        err = capsys.readouterr().err.strip().splitlines()
        want = f"store {root} has layout version '2', not the 1 this regproxy knows"
        assert code == 2 and len(err) == 1 and want in err[0], (command, err)
        assert "newer release" in err[0]
        assert files(root) == before, command


def test_a_v7_store_keeps_its_unreferenced_bytes_after_the_upgrade(tmp_path: Path) -> None:
    """Version 8 keeps the bytes nothing references in ``totals`` (the overview summed them):
    a store at version 7, with such bytes, opens with them counted and keeps them after."""
    path = tmp_path / "index.db"
    ix = Index(path)
    ix.open()
    ix.ensure_repo("spectro-images/x", None, "x")
    ix.add_blob("spectro-images/x", "sha256:" + "a" * 64, 700)  # pushed, no manifest yet
    ix.close()
    set_back_to_v7(path)  # no column, the v7 triggers (here: none) and its version
    ix = Index(path)
    ix.open()
    try:
        assert schema.user_version(ix.db) == schema.SCHEMA_VERSION
        assert ix.totals().loose_bytes == 700 == ix.recount().loose_bytes
        assert ix.totals() == ix.recount()
        ix.add_blob("spectro-images/x", "sha256:" + "b" * 64, 50)
        assert ix.totals() == ix.recount() and ix.totals().loose_bytes == 750
    finally:
        ix.close()


def at_version(path: Path, version: int) -> None:
    """An unversioned index (:func:`v1_store`) brought to ``version`` (2 to 7) by the released
    steps, as that release left it: without what a later one added to those steps (version 8's
    ``loose_bytes`` and the triggers that keep it, which version 3 creates today)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN")
        for to, step in schema.MIGRATIONS:
            if to <= version:
                step(db)
        db.execute("COMMIT")
    finally:
        db.close()
    if version >= 3:
        set_back_to_v7(path)
    db = sqlite3.connect(path)
    try:
        db.execute(f"PRAGMA user_version = {version}")
    finally:
        db.close()


def shape(path: Path) -> dict[str, object]:
    """An index's schema as the code sees it: each table's columns, each index's table and
    columns, each trigger's text (not the tables' text: the fixture's DDL is spelt otherwise)."""
    db = sqlite3.connect(path)
    try:
        out: dict[str, object] = {}
        for kind, name, table, sql in db.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"
        ):
            if kind == "table":
                out[name] = [r[1:] for r in db.execute(f"PRAGMA table_info({name})")]
            elif kind == "index":
                out[name] = (table, [r[2] for r in db.execute(f"PRAGMA index_info({name})")])
            else:
                out[name] = sql
        return out
    finally:
        db.close()


@pytest.mark.parametrize("version", [2, 3, 4, 5])
def test_a_store_of_schema_2_to_5_is_upgraded_to_the_schema_of_a_new_one(
    tmp_path: Path, version: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Each version between the unversioned one and 6 upgrades to exactly the schema a new
    store gets, with its rows, pins and counts."""
    path = v1_store(tmp_path / "store")
    at_version(path, version)
    caplog.set_level(logging.INFO, logger="regproxy.index")
    reopen(path)
    want = f"from={version} to={schema.SCHEMA_VERSION} recount={'yes' if version < 3 else 'no'}"
    assert any(r.getMessage().endswith(want) for r in caplog.records), caplog.text
    new = tmp_path / "new.db"
    reopen(new)
    assert shape(path) == shape(new)
    ix = Index(path)
    ix.open()
    try:
        assert schema.user_version(ix.db) == schema.SCHEMA_VERSION
        assert ix.totals() == ix.recount()
        assert (ix.totals().stored_bytes, ix.totals().pinned_bytes) == (6900, 2600)
        assert {(p.repo, p.digest) for p in ix.list_pins()} == {(PUSHED, IDX), (PUSHED, M2)}
        assert ix.list_tags(PUSHED, None, None) == ["latest"]
    finally:
        ix.close()


def reopen(path: Path) -> None:
    """Open the index as the daemon's writer does (upgrading it), and close it."""
    ix = Index(path)
    try:
        ix.open()
    finally:
        ix.close()


def set_back_to_v7(path: Path) -> None:
    """An index of this release put back to schema version 7 (before ``loose_bytes``)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for name in ("totals_added", "totals_removed", "totals_changed"):
            db.execute(f"DROP TRIGGER {name}")
        db.execute("ALTER TABLE totals DROP COLUMN loose_bytes")
        db.execute("PRAGMA user_version = 7")
    finally:
        db.close()


def files(root: Path) -> dict[str, object]:
    """What a store holds: every file and directory by name (the WAL's ``-wal``/``-shm``
    aside: SQLite makes and removes those around any connection) with its size and mtime, and
    the index as a dump of its schema and rows, with its version."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith(("-wal", "-shm")):
            continue
        st = p.stat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else "dir"
    path = root / "index.db"
    if path.exists():
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            out["index.db"] = (schema.user_version(db), list(db.iterdump()))
        finally:
            db.close()
    return out


#: the commands that only read the store
READ_ONLY = (["fsck"], ["gc", "--dry-run"], ["pins"])


@pytest.mark.parametrize("command", READ_ONLY, ids=" ".join)
def test_a_command_that_only_reads_creates_and_upgrades_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """Plain fsck, gc --dry-run and pins open the index on readers only: no store is made
    where there is none, an older schema is refused with one line (exit 2) and left as it is,
    and on a current store they change no byte of it."""
    root = tmp_path / "store"
    conf = tmp_path / "regproxy.yaml"
    conf.write_text(yaml.safe_dump({"storage": {"root": str(root)}}))

    def run() -> tuple[int, list[str]]:
        capsys.readouterr()
        code = cli.main(["--config", str(conf), *command])
        return code, capsys.readouterr().err.strip().splitlines()

    code, err = run()
    assert code == 2 and len(err) == 1 and f"no index at {root / 'index.db'}" in err[0], err
    assert not root.exists()  # nothing made

    path = v1_store(root)  # unversioned (0), then version 7
    for version in (0, 7):
        if version == 7:
            reopen(path)  # upgraded to the current schema, then put back to 7
            set_back_to_v7(path)
        before = files(root)
        code, err = run()
        want = f"schema version {version}, older than the {schema.SCHEMA_VERSION}"
        assert code == 2 and len(err) == 1 and want in err[0], err
        assert "fsck --repair" in err[0]
        assert files(root) == before  # not upgraded, nothing made
    reopen(path)  # current again
    before = files(root)
    code, err = run()
    # no file of the fixture's blobs is on disk: fsck reports them missing (and exits 1)
    assert code == (1 if command == ["fsck"] else 0), err
    assert files(root) == before


#: the commands that would fill a store from the upstreams (a writer on purpose), with what
#: they need to get that far
FILLS_A_STORE = (
    ["export", "-o", "{tmp}/out.tar", "up.test/team/app:v1"],
    ["pin", "up.test/team/app:v1"],
    ["unpin", "up.test/team/app:v1"],
    ["prefetch", "--attempts", "1", "up.test/team/app:v1"],
)


@pytest.mark.parametrize("command", FILLS_A_STORE, ids=lambda c: c[0])
def test_a_filling_command_without_sync_on_a_root_without_a_store_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """``export``, ``pin``, ``unpin`` and ``prefetch`` with ``content.sync.enable: false``
    have nothing to pull from: on a ``storage.root`` that holds no store (a wrong root) they
    are refused with one line, exit 2, and nothing is made (each made an empty store, then
    failed on the image). With sync on they are writers on purpose (they pull the images
    through into the store): they make it, and say so on a line of their own, so that a wrong
    root does not pass unseen."""
    root = tmp_path / "store"
    conf = tmp_path / "regproxy.yaml"
    argv = ["--config", str(conf), *(a.format(tmp=tmp_path) for a in command)]
    upstream = {"up.test": {"url": "http://127.0.0.1:9"}}  # nothing listens: the pull fails
    conf.write_text(
        yaml.safe_dump(
            {
                "storage": {"root": str(root)},
                "content": {"sync": {"enable": False}},
                "upstreams": upstream,
            }
        )
    )
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no index at {root / 'index.db'}" in err[0], err
    want = f"{command[0]} without sync has no store to use and nothing to pull from"
    assert want in err[0] and "created nothing" in err[0], err
    assert not root.exists() and not (tmp_path / "out.tar").exists()  # nothing made

    conf.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "upstreams": upstream}))
    assert cli.main(argv) == 1  # the upstream refused: the image is not there
    captured = capsys.readouterr()
    assert (root / "index.db").exists() and not (tmp_path / "out.tar").exists()
    made = f"regproxy {command[0]}: made a new store at {root}"
    assert made in captured.err, (captured.out, captured.err)


def test_an_upgrade_says_so_before_it_starts_and_keeps_systemd_waiting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade runs before the listener and READY=1 (from before version 3 it recounts every
    row: tens of seconds at a million blobs): ``index.migrating`` is logged before it starts,
    and systemd is told to extend its start timeout (EXTEND_TIMEOUT_USEC) while it runs. A
    current or a new index logs and sends nothing."""
    path = v1_store(tmp_path / "store")
    with tempfile.TemporaryDirectory(prefix="rp-") as d:  # a socket path under 108 bytes
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(f"{d}/notify")
            sock.setblocking(False)
            monkeypatch.setenv("NOTIFY_SOCKET", f"{d}/notify")
            monkeypatch.delenv("WATCHDOG_USEC", raising=False)
            caplog.set_level(logging.INFO, logger="regproxy.index")
            for version in (0, 7):
                if version == 7:
                    set_back_to_v7(path)
                caplog.clear()
                reopen(path)
                lines = [r.getMessage() for r in caplog.records]
                migrating = [n for n, m in enumerate(lines) if m.startswith("index.migrating")]
                upgraded = [n for n, m in enumerate(lines) if m.startswith("index.upgraded")]
                assert migrating and upgraded and migrating[0] < upgraded[0], lines
                recount = "yes" if version < 3 else "no"
                want = f"from={version} to={schema.SCHEMA_VERSION} recount={recount}"
                assert lines[migrating[0]].endswith(want), lines
                sent = sock.recv(4096).decode().splitlines()
                assert f"EXTEND_TIMEOUT_USEC={start_extender.EXTEND_SECONDS * 1_000_000}" in sent, (
                    sent
                )
            caplog.clear()
            reopen(path)  # current: nothing to say
            reopen(tmp_path / "new.db")  # new: nothing to upgrade
            assert not [r for r in caplog.records if "index.migrat" in r.getMessage()]
            with pytest.raises(BlockingIOError):
                sock.recv(4096)
        finally:
            sock.close()
