"""Each repository's kept size (``repos.size``, regproxy.repo_sizes) is never wrong: after any
sequence of pushes, pull-throughs (the manifest first, its blobs after), an index stored before
its manifests, deletes, pins, evictions and gc, a kept size equals a full count, and the web
page's repository list and repository page show the full count for every repository, kept or
not, in every order."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from regproxy import repo_sizes, schema
from regproxy.app import count_sizes
from regproxy.index import Index, ManifestRecord
from regproxy.oci import Digest
from regproxy.registry import Registry
from regproxy.repo_sizes import COUNT_SQL, count_some
from regproxy.ui import queries
from tests.unit.test_index_totals import (
    OCI_INDEX,
    OCI_MANIFEST,
    UPSTREAM,
    World,
    index,
    manifest,
)


class SizedWorld(World):
    async def lazy_pull(self) -> None:
        """A pull-through as the proxy does it: the manifest stored, its blobs as asked for."""
        repo = self.rnd.choice(UPSTREAM)
        body_, blobs = self.image()
        ref = self.rnd.choice(["1.0", "2.0", "3.0"])
        await self.reg.put_manifest(repo, ref, body_, OCI_MANIFEST, verify_refs=False, pinned=False)
        self.held.append((repo, body_))
        await self.put_blobs(repo, self.rnd.sample(blobs, self.rnd.randint(0, len(blobs))))

    async def index_first(self) -> None:
        """An index pulled through before its manifests (they come when a client asks)."""
        repo = self.rnd.choice(UPSTREAM)
        (one, blobs1), (two, blobs2) = self.image(), self.image()
        top = index([one, two])
        await self.reg.put_manifest(repo, "multi", top, OCI_INDEX, verify_refs=False, pinned=False)
        self.held.append((repo, top))
        for m, blobs in ((one, blobs1), (two, blobs2)):
            if self.rnd.random() < 0.7:
                # a child, sometimes through another repository of the same upstream
                where = self.rnd.choice(UPSTREAM)
                await self.reg.put_manifest(
                    where, str(Digest.of(m)), m, OCI_MANIFEST, verify_refs=False, pinned=False
                )
                self.held.append((where, m))
                await self.put_blobs(where, blobs[: self.rnd.randint(0, len(blobs))])


def counted(path: Path) -> dict[str, int]:
    """Every repository's size, counted in full from the rows."""
    db = sqlite3.connect(path)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM repos")]
        sql = "SELECT " + COUNT_SQL.format(repo="?")
        return {n: int(db.execute(sql, (n,)).fetchone()[0]) for n in names}
    finally:
        db.close()


def kept(path: Path) -> dict[str, int | None]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, size FROM repos"))
    finally:
        db.close()


async def shown(reg: Registry, sort: str) -> dict[str, int]:
    """Every repository's size on the repository list, page by page (3 a page)."""
    sizes: dict[str, int] = {}
    after: str | None = None
    for _ in range(50):
        page = await reg.db.read(
            queries.repositories, project=None, q=None, limit=3, sort=sort, after=after
        )
        sizes |= {r.name: r.size for r in page.rows}
        if page.next_after is None:
            return sizes
        after = page.next_after
    raise AssertionError("more pages than repositories")


@pytest.mark.parametrize("seed", [4, 5])
async def test_kept_sizes_equal_a_full_count_after_any_sequence(
    registry: Registry, tmp_path: Path, seed: int
) -> None:
    rnd = random.Random(seed)
    world = SizedWorld(registry, rnd, tmp_path / "store")
    ops = {
        "push": world.push,
        "pull": world.pull_through,
        "lazy": world.lazy_pull,
        "index": world.index_first,
        "delete": world.delete,
        "pin": lambda: world.pin(True),
        "unpin": lambda: world.pin(False),
        "evict": world.evict,
        "gc": world.gc,
    }
    weights = [4, 2, 5, 3, 3, 1, 1, 1, 1]
    path = tmp_path / "store" / "index.db"
    done: list[str] = []
    moved = 0  # kept sizes a change forgot (the triggers at work)
    for step in range(70):
        name = rnd.choices(list(ops), weights)[0]
        before = kept(path)
        await ops[name]()
        done.append(name)
        after = kept(path)
        moved += sum(1 for n, s in before.items() if s is not None and after.get(n) is None)
        truth = counted(path)
        assert {n: s for n, s in after.items() if s is not None} == {
            n: truth[n] for n, s in after.items() if s is not None
        }, done
        if step % 7 == 6:
            holding = {n for n, m in _holding(path).items() if m > 0}
            for sort in ("name", "size", "pulled"):
                assert await shown(registry, sort) == {n: truth[n] for n in holding}, (sort, done)
            info = await registry.db.read(queries.repository, rnd.choice(sorted(truth)))
            assert info is not None and info.size == truth[info.name]
        if rnd.random() < 0.5:  # the daemon's background pass, sometimes before the next change
            if rnd.random() < 0.5:
                await count_sizes(registry.db)
            else:
                while await registry.db.write(count_some):
                    pass
            assert kept(path) == truth, done
    assert set(done) == set(ops)  # the seed exercised every kind of change
    assert moved > 10  # changes did forget kept sizes (and the counts above held)


def _holding(path: Path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, manifests FROM repos"))
    finally:
        db.close()


async def test_sizes_not_kept_are_counted_in_batches(registry: Registry, tmp_path: Path) -> None:
    """Sizes not kept (a store just upgraded to v6 keeps none) are counted a few repositories a
    statement until all are kept; a repair (rebuild_counts) forgets them again."""
    world = SizedWorld(registry, random.Random(9), tmp_path / "store")
    for _ in range(6):
        await world.push()
        await world.lazy_pull()
    path = tmp_path / "store" / "index.db"
    assert all(s is None for s in kept(path).values())
    repos = len(kept(path))
    assert repos >= 3
    assert await registry.db.write(count_some, 0.0, 1) == repos - 1  # one statement, one repo
    assert sum(1 for s in kept(path).values() if s is not None) == 1
    while await registry.db.write(count_some):
        pass
    assert kept(path) == counted(path)

    def repair(ix: Index) -> None:
        with ix.transaction() as db:
            schema.rebuild_counts(db)

    await registry.db.write(repair)
    assert all(s is None for s in kept(path).values())


def test_a_blob_under_an_index_of_indexes_forgets_the_top_repositorys_size(
    tmp_path: Path,
) -> None:
    """An index listing an index (OCI allows any depth) kept in one repository, its manifests
    in another: a blob arriving three manifests below the first repository's row changes its
    size too (the walk up from a digest that gets or loses its file has no fixed depth)."""
    ix = Index(tmp_path / "index.db")
    ix.open()
    try:

        def rec(digest: str, blobs: list[str], children: list[str]) -> ManifestRecord:
            return ManifestRecord(digest, OCI_INDEX, 10, None, None, None, blobs, children)

        top, mid, image, layer = (f"sha256:{c * 64}" for c in "abcd")
        for repo in ("top", "below"):
            ix.ensure_repo(repo, None, repo)
        ix.add_manifest("top", rec(top, [], [mid]))
        ix.add_manifest("below", rec(mid, [], [image]))
        ix.add_manifest("below", rec(image, [layer], []))
        while count_some(ix):
            pass
        ix.add_blob("below", layer, 1000)  # the layer arrives after its manifests (a lazy pull)
        sizes = kept(tmp_path / "index.db")
        truth = counted(tmp_path / "index.db")
        assert truth == {"top": 1030, "below": 1020}
        assert {n: s for n, s in sizes.items() if s is not None} == {
            n: truth[n] for n, s in sizes.items() if s is not None
        }
        while count_some(ix):
            pass
        assert kept(tmp_path / "index.db") == truth
    finally:
        ix.close()


def test_an_upgrade_from_v6_counts_every_kept_size_again(tmp_path: Path) -> None:
    """A version 6 store may keep a stale size (its trigger walked two manifests up): version 7
    forgets them all, to be counted again, and walks further up."""
    path = tmp_path / "index.db"
    ix = Index(path)
    ix.open()
    ix.ensure_repo("top", None, "top")
    ix.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE repos SET size = 123")
    db.execute("PRAGMA user_version = 6")
    db.commit()
    db.close()
    ix = Index(path)
    ix.open()
    try:
        assert kept(path) == {"top": None}
        assert ix.totals() == ix.recount()
        (body,) = ix.db.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'size_stored'"
        ).fetchone()
        assert "x3.parent" in body
    finally:
        ix.close()


async def test_the_background_count_walks_on_a_reader_and_the_writer_only_marks_and_keeps(
    registry: Registry, tmp_path: Path
) -> None:
    """The daemon's count (regproxy.app.count_sizes) walks each repository on a reader: on the
    writer it only marks the repositories it counts and keeps what it counted, a few rows (a
    repository of 5,000 manifests held the writer ~0.4 s in one statement, 4 of them 1.5 s).
    A change that lands between the mark and the keep is not lost: that size is counted again."""
    world = SizedWorld(registry, random.Random(3), tmp_path / "store")
    for _ in range(5):
        await world.push()
        await world.lazy_pull()
    path = tmp_path / "store" / "index.db"
    on_writer: list[str] = []

    def trace(ix: Index) -> None:
        ix.db.set_trace_callback(on_writer.append)

    await registry.db.write(trace)
    await count_sizes(registry.db)
    await registry.db.write(lambda ix: ix.db.set_trace_callback(None))
    assert kept(path) == counted(path)
    assert on_writer and not [s for s in on_writer if "RECURSIVE" in s.upper()]

    # a change between the mark and the keep: its repository's size is not kept stale
    await registry.db.write(lambda ix: ix.db.execute("UPDATE repos SET size = NULL"))
    names = await registry.db.write(repo_sizes.claim, 1000)
    assert sorted(names) == sorted(kept(path))
    for sort in ("name", "size"):  # a marked size is counted by the page, as one not kept
        assert await shown(registry, sort) == {
            n: s for n, s in counted(path).items() if _holding(path)[n] > 0
        }
    sizes = await registry.db.read(repo_sizes.measure, names)
    changed = world.held[0][0]
    layer = b"a layer pushed meanwhile"
    await world.put_blobs(changed, [layer, world.configs[0]])
    pushed = manifest(world.configs[0], [layer])
    await registry.put_manifest(changed, "meanwhile", pushed, OCI_MANIFEST)
    await registry.db.write(repo_sizes.keep, sizes)
    assert kept(path)[changed.canonical] is None
    still = {n: s for n, s in kept(path).items() if s is not None}
    assert still == {n: counted(path)[n] for n in still}
    await count_sizes(registry.db)
    assert kept(path) == counted(path)
