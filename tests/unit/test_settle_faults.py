"""A writer whose file a removal took between its placing and its index row, on a disk that then
fails the put-back (full: 507, EIO: 500): the row it wrote is taken back when no file of the
digest is left, so the index never names a missing file, and kept while a removal still holds the
file moved out (the row may be another writer's too: that removal puts the file back); nothing of
it is left in tmp/; the log line names the digest and the
repository (regproxy.settling). A put-back failing once is tried again from the spare.

Every writer: a push, a pull-through fetch, an import, a manifest ``PUT``. The put-back's fault
is an OSError with the errno a link on a full or broken disk gets, raised by the store's
``put_back`` while the file is not in place (a link to a name that exists is EEXIST first); a
manifest, written again from its bytes, fails on /dev/full or a dead pty as a fetch's write does
(tests.unit.test_fetch_disk_faults)."""

from __future__ import annotations

import errno
import io
import logging
import os
import tarfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from regproxy.bundle import Importer
from regproxy.cli.bundles import run_import
from regproxy.config import config_from_dict, load_config
from regproxy.errors import OCIError, StorageFull, StoreFailed
from regproxy.index import Index
from regproxy.names import NameResolver, RepoName
from regproxy.oci import Digest
from regproxy.proxy import ProxyRegistry
from regproxy.registry import LocalRegistry
from regproxy.removal import _finish, remove
from regproxy.settling import PutBackFailed, PutBackFull
from regproxy.store import BlobWriter, Store
from tests.fakes import FakeUpstream
from tests.uiclient import login, start
from tests.unit.test_evict import OCI_MANIFEST, chunks, layer, up
from tests.unit.test_evict import manifest as image_manifest
from tests.unit.test_fetch_disk_faults import FaultyWriter
from tests.unit.test_import_evict_race import LAYER, layout, manifest
from tests.unit.test_removal import RacingIndex

KINDS = ["push", "fetch", "import", "manifest"]


class BrokenStore(Store):
    """Once ``fails`` is set, that many put-backs of a file not in place fail with ``fault``,
    and new writers' writes fail with it."""

    fault = "ENOSPC"
    fails = 0

    def put_back(self, digest: Digest, source: Path) -> bool:
        if self.fails and self.stat(digest) is None:
            self.fails -= 1
            code = errno.ENOSPC if self.fault == "ENOSPC" else errno.EIO
            raise OSError(code, os.strerror(code))
        return super().put_back(digest, source)

    def writer(
        self, name: str | None = None, *, append: bool = False, deferred: bool = False
    ) -> BlobWriter:
        if not self.fails:
            return super().writer(name, append=append, deferred=deferred)
        w = FaultyWriter(self, self.temp_path(name), append=append, deferred=deferred)
        w.fault, w.fail_at = self.fault, 0
        return w


class Case:
    """One writer of ``data`` into ``repo`` on a broken store, a removal before its row."""

    def __init__(
        self, kind: str, reg: LocalRegistry | ProxyRegistry, repo: RepoName, data: bytes
    ) -> None:
        self.kind, self.reg, self.repo, self.data = kind, reg, repo, data
        self.digest = Digest.of(data)
        assert isinstance(reg.store, BrokenStore) and isinstance(reg.db, RacingIndex)
        self.store, self.db = reg.store, reg.db
        self.write: Callable[[], Awaitable[object]] = lambda: _never()

    def strike(self, fault: str, fails: int) -> None:
        """Right before the writer's row: a removal takes its file, then the disk breaks."""

        async def removal() -> None:
            d = str(self.digest)
            assert await remove(self.store, [d], lambda ds: self.db.read(Index.stored_among, ds))
            self.store.fault, self.store.fails = fault, fails

        self.db.target, self.db.hook = str(self.digest), removal

    async def row(self) -> object:
        fn = Index.manifest_in_repo if self.kind == "manifest" else Index.blob_in_repo
        return await self.reg.db.read(fn, self.repo.canonical, str(self.digest))


async def _never() -> None:
    raise AssertionError("no writer")


@pytest.fixture
async def case(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Case]:
    kind, root = request.param, tmp_path / "store"
    store, db = BrokenStore(root), RacingIndex(root / "index.db")
    if kind == "fetch":
        server = await FakeUpstream().start()
        cfg = {
            "storage": {"root": str(root), "min_free": 0},
            "upstreams": {server.hostport: {"url": server.url, "alias": "fake.test"}},
        }
        config = config_from_dict(cfg)
        proxy = ProxyRegistry(store, db, config)
        await proxy.open()
        repo, _ = NameResolver(config).parse_reference("fake.test/team/app")
        c = Case(kind, proxy, repo, b"fetched" * 20_000)  # not a small blob: a transfer
        server.add_blob(c.data)

        async def fetch() -> None:
            blob = await proxy.get_blob(repo, c.digest)
            if blob.stream is not None:
                await blob.stream.wait_done()

        c.write = fetch
        try:
            yield c
        finally:
            await proxy.close()
            await server.stop()
        return
    reg = LocalRegistry(store, db)
    await reg.open()
    if kind == "import":
        c = Case(kind, reg, RepoName("spectro-images/docker.io/team/new"), LAYER)
        path, _ = layout(tmp_path / "bundle", b'{"new": true}')
        importer = Importer(reg, NameResolver(load_config(None, env={})))
        c.write = lambda: importer.import_path(path)
    elif kind == "push":
        c = Case(kind, reg, up("team/again"), layer("pushed"))
        c.write = lambda: reg.uploads.monolithic(c.repo, c.digest, chunks(c.data), len(c.data))
    else:
        body = manifest(b'{"put": true}')
        c = Case(kind, reg, up("team/again"), body)
        c.write = lambda: reg.put_manifest(
            c.repo, "v1", body, OCI_MANIFEST, verify_refs=False, pinned=True
        )
    try:
        yield c
    finally:
        await reg.close()


@pytest.mark.parametrize("case", KINDS, indirect=True)
@pytest.mark.parametrize("fault", ["ENOSPC", "EIO"])
async def test_a_file_the_disk_cannot_put_back_takes_its_row_back(
    case: Case, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="regproxy.store")
    case.strike(fault, fails=2)
    with pytest.raises(OCIError) as err:
        await case.write()
    expected = PutBackFull if fault == "ENOSPC" else PutBackFailed
    assert type(err.value) is expected, err.value
    assert err.value.http_status == (507 if fault == "ENOSPC" else 500)
    assert f"the disk refused putting {case.digest} back" in err.value.detail
    assert await case.row() is None  # no row names the missing file
    assert case.store.stat(case.digest) is None
    assert [p.name for p in case.store.tmp.iterdir()] == []  # no spare, nothing moved out
    lines = [r.getMessage() for r in caplog.records if "settle_failed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"digest={case.digest} repo={case.repo.canonical} " in lines[0]


@pytest.mark.parametrize("case", ["push", "fetch", "import"], indirect=True)
async def test_a_put_back_failing_once_is_tried_again_from_the_spare(case: Case) -> None:
    """(A manifest is written again from its bytes, not put back from a spare.)"""
    case.strike("EIO", fails=1)
    await case.write()
    assert await case.row() is not None
    assert case.store.read(case.digest) == case.data
    assert [p.name for p in case.store.tmp.iterdir()] == []


# Two writers of one digest (from a review of the first version, which took back the shared row
# and lost the other writer's acknowledged content): C's write lands while a removal chosen before
# C's row moves the file out; A's write of the same digest then fails its put-back. A is told,
# the row stays, and the removal, asking the index, puts the file back for both.


async def _racing(tmp_path: Path) -> tuple[LocalRegistry, BrokenStore, RacingIndex]:
    root = tmp_path / "store"
    reg = LocalRegistry(BrokenStore(root), RacingIndex(root / "index.db"))
    await reg.open()
    assert isinstance(reg.store, BrokenStore) and isinstance(reg.db, RacingIndex)
    return reg, reg.store, reg.db


async def test_a_failed_put_keeps_the_manifest_another_put_of_it_stored(tmp_path: Path) -> None:
    reg, store, db = await _racing(tmp_path)
    repo = up("team/app")
    m = manifest(b'{"m": 1}')
    dm = Digest.of(m)
    moved: list[Path] = []

    async def race() -> None:
        await reg.put_manifest(repo, "t", m, OCI_MANIFEST, verify_refs=False)  # C: 201
        moved.append(store.move_out(dm))  # the removal moves it out now
        store.fault, store.fails = "ENOSPC", 2

    db.target, db.hook = str(dm), race
    with pytest.raises(StorageFull):  # A: PUT M:u, its file cannot go back: 507
        await reg.put_manifest(repo, "u", m, OCI_MANIFEST, verify_refs=False)
    store.fails = 0
    stored = await db.read(Index.stored_among, [str(dm)])
    _finish(store, stored, [(str(dm), dm, moved[0])])  # the removal asks, and finishes
    try:
        assert await reg.local_manifest(repo, "t") is not None  # C's acknowledged M:t
        assert store.stat(dm) == len(m)
    finally:
        await reg.close()


async def test_a_failed_push_keeps_the_layer_another_push_of_it_stored(tmp_path: Path) -> None:
    reg, store, db = await _racing(tmp_path)
    repo = up("team/app")
    lay, config = layer("shared"), b'{"c": 1}'
    d = Digest.of(lay)
    moved: list[Path] = []

    async def race() -> None:  # C pushes the layer, the config and manifest v1: all 201
        for b in (config, lay):
            await reg.uploads.monolithic(repo, Digest.of(b), chunks(b), len(b))
        await reg.put_manifest(repo, "v1", image_manifest(config, [lay], None), OCI_MANIFEST)
        moved.append(store.move_out(d))
        store.fault, store.fails = "EIO", 2

    db.target, db.hook = str(d), race
    with pytest.raises(StoreFailed):  # A's push of the same layer: 500
        await reg.uploads.monolithic(repo, d, chunks(lay), len(lay))
    store.fails = 0
    stored = await db.read(Index.stored_among, [str(d)])
    _finish(store, stored, [(str(d), d, moved[0])])
    try:
        assert await db.read(Index.blob_in_repo, repo.canonical, str(d)) is not None
        assert store.stat(d) == len(lay)
    finally:
        await reg.close()


# A failed PUT leaves its repository as it was (from a review: the first version deleted the
# manifest with every tag naming it, so a failed ``PUT M:u`` lost ``u``'s old value and the tags
# that named M before it).


class GoneStore(BrokenStore):
    """Runs ``on_missing`` (on the executor) when a writer asks whether any file is left."""

    on_missing: Callable[[], None] | None = None

    def missing(self, digest: Digest) -> bool:
        if self.on_missing is not None:
            self.on_missing()
        return super().missing(digest)


async def _failing_put(
    tmp_path: Path,
    before: dict[str, bytes],
    also_gone: str | None = None,
    pinned_before: bool = True,
) -> tuple[dict[str, str | None], str, str, bool]:
    """``before`` put as tags of team/app (pinned, as a push, or not, as a pull); then ``PUT
    M:u`` whose file is lost right before its row and the disk cannot write again (507);
    ``also_gone``: a tag whose manifest is deleted right before the PUT takes its row back.
    The tags after, M's digest, whether M's row is left, and whether it is pinned."""
    root = tmp_path / "store"
    store = GoneStore(root)
    reg = LocalRegistry(store, RacingIndex(root / "index.db"))
    await reg.open()
    db = reg.db
    assert isinstance(db, RacingIndex)
    repo, m = up("team/app"), manifest(b'{"m": 1}')
    try:
        for tag, body in before.items():
            await reg.put_manifest(
                repo, tag, body, OCI_MANIFEST, verify_refs=False, pinned=pinned_before
            )
        dm = str(Digest.of(m))

        async def lost() -> None:  # the file is lost for good (a removal's, or the disk's)
            moved = store.move_out(Digest.parse(dm))
            assert moved is not None
            moved.unlink()
            store.fault, store.fails = "ENOSPC", 2

        if also_gone is not None:
            gone = str(Digest.of(before[also_gone]))
            writer = Index(root / "index.db")  # another connection: as another process would
            store.on_missing = lambda: writer.delete_manifest(repo.canonical, gone)
        db.target, db.hook = dm, lost
        with pytest.raises(StorageFull):
            await reg.put_manifest(repo, "u", m, OCI_MANIFEST, verify_refs=False)
        tags = {}
        for tag in [*before, "u"]:
            found = await reg.local_manifest(repo, tag)
            tags[tag] = None if found is None else found[0].digest
        row = await db.read(Index.manifest_in_repo, repo.canonical, dm)
        pins = {p.digest for p in await db.read(Index.list_pins, repo.canonical)}
        return tags, dm, "kept" if row is not None else "gone", dm in pins
    finally:
        await reg.close()


async def test_a_failed_put_puts_the_tag_back_where_it_was(tmp_path: Path) -> None:
    x = manifest(b'{"x": 1}')
    tags, _, row, _ = await _failing_put(tmp_path, {"u": x})
    assert tags == {"u": str(Digest.of(x))}, "the failed PUT moved or deleted u"
    assert row == "gone"  # this PUT's row: no row names the missing file


async def test_a_failed_put_keeps_the_row_and_tags_the_repository_held_before(
    tmp_path: Path,
) -> None:
    x, m = manifest(b'{"x": 1}'), manifest(b'{"m": 1}')
    tags, dm, row, pinned = await _failing_put(tmp_path, {"u": x, "t": m})
    assert tags == {"u": str(Digest.of(x)), "t": dm}
    assert (
        row == "kept" and pinned
    )  # not this PUT's row (a lookup finding the file gone removes it)


async def test_a_failed_put_takes_back_the_pin_it_gave_a_manifest_held_unpinned(
    tmp_path: Path,
) -> None:
    """M was pulled through (unpinned); a failed ``PUT M:u`` pinned it: the pin goes again."""
    x, m = manifest(b'{"x": 1}'), manifest(b'{"m": 1}')
    tags, dm, row, pinned = await _failing_put(tmp_path, {"u": x, "t": m}, pinned_before=False)
    assert tags == {"u": str(Digest.of(x)), "t": dm} and row == "kept"
    assert not pinned, "the failed PUT left its pin on a manifest it did not add"


async def test_a_failed_put_drops_its_tag_when_the_old_manifest_went_meanwhile(
    tmp_path: Path,
) -> None:
    x = manifest(b'{"x": 1}')
    tags, _, row, _ = await _failing_put(tmp_path, {"u": x}, also_gone="u")
    assert tags == {"u": None} and row == "gone"


async def test_the_import_command_names_the_file_the_disk_refused_to_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``regproxy import`` (the command's function, in this process) whose layer the disk
    cannot put back once its row is in: exit 1, one line naming the bundle and the digest,
    and no claim that nothing was imported (it was committing)."""
    root = tmp_path / "store"
    config = config_from_dict({"storage": {"root": str(root), "min_free": 0}})
    store, db = BrokenStore(root), RacingIndex(root / "index.db")
    monkeypatch.setattr("regproxy.proxy.build_registry", lambda c: ProxyRegistry(store, db, c))
    path, _ = layout(tmp_path / "bundle", b'{"new": true}')
    d = str(Digest.of(LAYER))

    async def removal() -> None:
        assert await remove(store, [d], lambda ds: db.read(Index.stored_among, ds))
        store.fault, store.fails = "ENOSPC", 2

    db.target, db.hook = d, removal
    assert await run_import(config, [path], None) == 1
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if str(path) in ln)
    assert f"regproxy import: {path}: failed: the disk refused putting {d} back" in line, line
    assert "ENOSPC" in line and "nothing of this bundle" not in line, line


@pytest.mark.parametrize(("fault", "status"), [("ENOSPC", 507), ("EIO", 500)])
async def test_the_upload_page_names_the_file_the_disk_refused_to_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, status: int
) -> None:
    """A bundle uploaded on the web page whose layer the disk cannot put back once its row is
    in: the upload page answers (507 full, else 500), naming the file and the digest and that
    what was committed before it stays; not the API's JSON error."""
    root = tmp_path / "store"
    store, db = BrokenStore(root), RacingIndex(root / "index.db")
    monkeypatch.setattr(
        "regproxy.app.build_registry", lambda c, **kw: ProxyRegistry(store, db, c, **kw)
    )
    path, _ = layout(tmp_path / "bundle", b'{"new": true}')
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    d = str(Digest.of(LAYER))

    async def removal() -> None:
        assert await remove(store, [d], lambda ds: db.read(Index.stored_among, ds))
        store.fault, store.fails = fault, 2

    db.target, db.hook = d, removal
    client = await start(root, storage={"min_free": 0})
    try:
        form = aiohttp.FormData()
        form.add_field("csrf", await login(client))
        form.add_field("bundle", buf.getvalue(), filename="my-images.tar")
        resp = await client.post("/ui/upload", data=form)
        text = await resp.text()
        assert resp.status == status and resp.content_type == "text/html", text[-600:]
        assert f"my-images.tar: failed: the disk refused putting {d} back" in text, text[-600:]
        assert "what was committed before it stays" in text
    finally:
        await client.close()
