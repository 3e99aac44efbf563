"""A file eviction removes while a writer stores the same digest again keeps its bytes, whatever
the interleaving and whichever process the writer runs in (regproxy.removal): the writer runs
to its end right before or right after eviction moves the file out, or a removal runs whole
between a writer's placing and its index row. The tool is a second registry on the same store
(`regproxy import` / `prefetch` beside the daemon)."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.config import config_from_dict
from regproxy.errors import BlobUnknown, ManifestUnknown
from regproxy.evict import Evictor
from regproxy.evict_batch import evict_lru
from regproxy.index import Index
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry
from regproxy.removal import remove
from regproxy.store import BlobWriter, Store
from tests.unit.test_evict import NOW, OCI_MANIFEST, Shop, chunks, layer, up


class MovingStore(Store):
    """Runs ``hook`` (on the removal's thread) right before or after ``target`` moves out."""

    target: Digest | None = None
    after = False
    hook: Callable[[], None] | None = None

    def move_out(self, digest: Digest) -> Path | None:
        hook = self.hook if digest == self.target else None
        if hook is not None:
            self.hook = None
            if not self.after:
                hook()
        moved = super().move_out(digest)
        if hook is not None and self.after:
            hook()
        return moved


class RacingIndex(AsyncIndex):
    """Awaits ``hook`` right before the row of ``target`` is written (after the writer placed
    its file)."""

    target: str | None = None
    hook: Callable[[], Awaitable[object]] | None = None

    async def write(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hook = self.hook
        if hook is not None and fn in (Index.add_blob, Index.add_manifest):
            names = args[1].digest if fn is Index.add_manifest else args[1]
            if names == self.target:
                self.hook = None
                await hook()
        return await super().write(fn, *args, **kwargs)


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    root = tmp_path / "store"
    reg = LocalRegistry(MovingStore(root), RacingIndex(root / "index.db"))
    await reg.open()
    yield Shop(reg)
    await reg.close()


@pytest.fixture
async def tool(tmp_path: Path, shop: Shop) -> AsyncIterator[LocalRegistry]:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open(sweep=False)
    yield reg
    await reg.close()


def writers(reg: LocalRegistry, data: bytes) -> dict[str, Callable[[], Awaitable[object]]]:
    d = Digest.of(data)
    return {
        "push": lambda: reg.uploads.monolithic(up("team/again"), d, chunks(data), len(data)),
        "manifest": lambda: reg.put_manifest(
            up("team/again"), "v2", data, OCI_MANIFEST, verify_refs=False, pinned=True
        ),
    }


async def image(shop: Shop, kind: str) -> bytes:
    """An image evicted whole; returns the bytes the writer stores again (layer or manifest)."""
    data = layer("stored twice")
    body = await shop.image(up("team/old"), "v1", [data], at=100.0)
    return data if kind == "push" else body


async def kept(reg: LocalRegistry, kind: str, data: bytes) -> None:
    """The writer's row and its file, with the bytes."""
    d = Digest.of(data)
    repo = up("team/again").canonical
    if kind == "push":
        assert await reg.db.read(Index.blob_in_repo, repo, str(d)) is not None
    else:
        assert await reg.db.read(Index.manifest_in_repo, repo, str(d)) is not None
    assert reg.store.read(d) == data
    assert [p.name for p in reg.store.tmp.iterdir()] == []  # no spare, nothing moved out left


@pytest.mark.parametrize("process", ["daemon", "tool"])
@pytest.mark.parametrize("after", [False, True], ids=["before_move", "after_move"])
@pytest.mark.parametrize("kind", ["push", "manifest"])
async def test_a_digest_stored_again_while_eviction_removes_it_keeps_its_file(
    shop: Shop, tool: LocalRegistry, tmp_path: Path, kind: str, after: bool, process: str
) -> None:
    data = await image(shop, kind)
    reg = shop.reg if process == "daemon" else tool
    loop = asyncio.get_running_loop()
    store = shop.reg.store
    assert isinstance(store, MovingStore)
    done: list[object] = []

    def hook() -> None:  # on the removal's thread: the writer runs to its end on the loop
        fut = asyncio.run_coroutine_threadsafe(writers(reg, data)[kind](), loop)
        done.append(fut.result(timeout=10))

    store.target, store.after, store.hook = Digest.of(data), after, hook
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1, "min_free": 0}}
    )
    r = await Evictor(shop.reg, config, clock=lambda: NOW).check()
    assert r is not None and r.manifests == 1 and done
    await kept(reg, kind, data)


@pytest.mark.parametrize("kind", ["push", "manifest"])
async def test_a_removal_between_a_writers_file_and_its_row_is_undone_by_the_writer(
    shop: Shop, kind: str
) -> None:
    """The removal asks the index before the writer's row is in: it deletes the file the writer
    placed; the writer, checking after its row, puts it back."""
    data = await image(shop, kind)
    d = Digest.of(data)
    batch = await shop.reg.db.write(  # the old rows gone (an eviction batch), files still there
        evict_lru, 10**12, (float("-inf"), "", ""), now=NOW, in_use=0.0, busy=()
    )
    assert str(d) in batch.files
    db = shop.reg.db
    assert isinstance(db, RacingIndex)
    removed: list[list[str]] = []

    async def removal() -> None:
        removed.append(
            await remove(shop.reg.store, [str(d)], lambda ds: db.read(Index.stored_among, ds))
        )

    db.target, db.hook = str(d), removal
    await writers(shop.reg, data)[kind]()
    assert removed == [[str(d)]]  # it did delete the file the writer had placed
    await kept(shop.reg, kind, data)


async def test_a_cancelled_removal_finishes_what_it_moved_out(shop: Shop) -> None:
    """Cancelled between moving a stored digest's file out and putting it back: the removal
    runs to its end (the file goes back) before the cancellation is seen."""
    data = layer("cancelled")
    await shop.image(up("team/old"), "v1", [data], at=100.0)
    d = Digest.of(data)
    store = shop.reg.store
    assert isinstance(store, MovingStore)
    moved = asyncio.Event()
    loop = asyncio.get_running_loop()
    store.target, store.after = d, True
    store.hook = lambda: (loop.call_soon_threadsafe(moved.set), time.sleep(0.05))[0]
    task = asyncio.create_task(
        remove(store, [str(d)], lambda ds: shop.reg.db.read(Index.stored_among, ds))
    )
    await moved.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.read(d) == data  # stored: put back, not left in tmp/
    assert list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("kind", ["blob", "manifest"])
async def test_a_read_while_a_removal_has_the_file_out_forgets_nothing(
    shop: Shop, kind: str
) -> None:
    """A removal that will put a stored digest's file back has it moved out when a read comes:
    the read misses (as if evicted since its lookup) but the rows stay, and the next read has it.
    A file lost for good (none moved out) is still forgotten."""
    repo = up("team/kept")
    data = layer("read in the window")
    body = await shop.image(repo, "v1", [data], pinned=True, at=100.0)
    target = data if kind == "blob" else body
    d = Digest.of(target)
    reg, loop = shop.reg, asyncio.get_running_loop()
    store = reg.store
    assert isinstance(store, MovingStore)
    missed: list[BaseException] = []

    async def read() -> object:
        reg.cache.forget(bodies=[str(d)], manifests=[(repo.canonical, str(d))])
        if kind == "blob":
            return await reg.get_blob(repo, d)
        return await reg.get_manifest(repo, str(d))

    def hook() -> None:
        try:
            asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=10)
        except Exception as exc:  # the miss
            missed.append(exc)

    store.target, store.after, store.hook = d, True, hook
    assert await remove(store, [str(d)], lambda ds: reg.db.read(Index.stored_among, ds)) == []
    assert missed  # the file was out when the read came
    got = await read()
    assert (got.data if kind == "blob" else got.body) == target  # type: ignore[attr-defined]
    # lost for good: forgotten
    store.delete(d)
    with pytest.raises((BlobUnknown, ManifestUnknown)):
        await read()
    if kind == "blob":
        assert await reg.db.read(Index.blob_in_repo, repo.canonical, str(d)) is None
    else:
        assert await reg.db.read(Index.manifest_in_repo, repo.canonical, str(d)) is None


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
async def test_a_file_a_crash_left_moved_out_goes_back_at_start(
    tmp_path: Path, algorithm: str
) -> None:
    """A crash between a removal's move and its put-back: the next start puts the file back
    (an unindexed one is then gc's orphan), and gc beside a daemon leaves moved-out files alone."""
    store = Store(tmp_path / "s")
    store.open()
    data = b"moved out when the process died"
    d = Digest.of(data, algorithm)
    store.write_bytes(d, data)
    moved = store.move_out(d)
    assert moved is not None and store.stat(d) is None and not store.missing(d)
    store.open()
    assert store.read(d) == data
    assert list(store.tmp.iterdir()) == []


def _committed_then_moved_out(store: Store, data: bytes) -> tuple[BlobWriter, str]:
    """A writer's file committed, then moved out by a removal before its row: the writer, and
    the name of its spare."""
    d = Digest.of(data)
    w = store.writer()
    w.write(data)
    w.commit(d)
    assert w.spare is not None and store.move_out(d) is not None
    return w, w.spare.name


class SyncedStore(Store):
    """Records each directory fsync with the names in tmp/ at that moment."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.synced: list[tuple[Path, list[str]]] = []

    def sync_dir(self, path: Path) -> None:
        self.synced.append((path, sorted(p.name for p in self.tmp.iterdir())))
        super().sync_dir(path)


async def test_a_put_back_is_durable_before_the_name_it_came_from_goes(tmp_path: Path) -> None:
    """A removal putting a stored digest's file back, and a writer putting its own back from
    its spare, fsync the blob's directory while the name in tmp/ still exists (a power loss
    then keeps the file of a durable row); deleting what nobody stores syncs nothing."""
    store = SyncedStore(tmp_path / "s")
    store.open()
    kept, gone = Digest.of(b"stored again"), Digest.of(b"evicted")
    store.write_bytes(kept, b"stored again")
    store.write_bytes(gone, b"evicted")

    async def stored(ds: list[str]) -> set[str]:
        return {str(kept)}

    store.synced.clear()
    assert await remove(store, [str(gone)], stored) == [str(gone)]
    assert store.synced == []  # eviction's common path: no fsync per file
    assert await remove(store, [str(kept)], stored) == []
    assert len(store.synced) == 1
    where, names = store.synced[0]
    assert where == store.blob_path(kept).parent
    assert [n for n in names if n.startswith(f"{kept.hex}.out-")]  # not yet deleted
    assert store.read(kept) == b"stored again" and list(store.tmp.iterdir()) == []
    # a writer whose file a removal took before its row: put back from its spare, synced first
    data = b"written while a removal ran"
    d = Digest.of(data)
    w, spare = _committed_then_moved_out(store, data)
    store.synced.clear()
    w.settle(d)
    assert len(store.synced) == 1
    where, names = store.synced[0]
    assert where == store.blob_path(d).parent and spare in names
    assert store.read(d) == data


@pytest.mark.parametrize("by", ["start", "gc"])
async def test_a_spare_a_killed_writer_left_puts_its_file_back_if_its_row_is_in(
    tmp_path: Path, by: str
) -> None:
    """A tool killed between its row and its settle, while a removal took its file: its spare in
    tmp/ puts the file back, at the daemon's next start, or by gc once it is old enough that no
    live writer can own it. A spare whose digest nobody stores, or whose file is in place, is
    deleted."""
    from regproxy.maintenance import gc

    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    repo, store = up("team/tool"), reg.store

    async def killed(data: bytes, row: bool, taken: bool) -> Digest:
        d = Digest.of(data)
        w = store.writer()
        w.write(data)
        w.commit(d)
        if row:
            await reg.index_blob(repo, d, len(data))
        if taken:  # a removal that asked the index before the row: moved out and deleted
            moved = store.move_out(d)
            assert moved is not None
            moved.unlink()
        return d  # and no settle: the process died

    lost = await killed(b"row in, file taken", row=True, taken=True)
    orphan = await killed(b"no row, file taken", row=False, taken=True)
    kept = await killed(b"row in, file in place", row=True, taken=False)
    assert len(list(store.tmp.iterdir())) == 3 and store.stat(lost) is None
    if by == "start":
        await reg.close()
        reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
        await reg.open()
    else:
        config = config_from_dict({"storage": {"root": str(root)}})
        await gc(config)  # just made: a live writer may own them
        assert len(list(store.tmp.iterdir())) == 3
        report = await gc(config, now=time.time() + 7200)
        assert len([n for n, _ in report.temp_files if n.endswith(".spare")]) == 3
    try:
        assert reg.store.read(lost) == b"row in, file taken"
        assert (await reg.get_blob(repo, lost)).size == len(b"row in, file taken")
        assert reg.store.stat(orphan) is None
        assert reg.store.read(kept) == b"row in, file in place"
        assert list(reg.store.tmp.iterdir()) == []
    finally:
        await reg.close()


class FailingSyncStore(SyncedStore):
    """The first directory fsync fails (EIO), after its link was made."""

    def sync_dir(self, path: Path) -> None:
        fail = not self.synced
        super().sync_dir(path)
        if fail:
            raise OSError(errno.EIO, "fsync of the directory failed")


def test_a_put_back_whose_directory_sync_failed_is_synced_again(tmp_path: Path) -> None:
    """settle's second try finds the file in place (the first linked it, then its directory's
    fsync failed): it syncs again before the spare goes, not only when it linked (a review)."""
    store = FailingSyncStore(tmp_path / "s")
    store.open()
    data = b"linked back, not yet durable"
    d = Digest.of(data)
    w, spare = _committed_then_moved_out(store, data)
    w.settle(d)
    assert len(store.synced) == 2  # the failed one, and one more while the spare still existed
    assert all(
        where == store.blob_path(d).parent and spare in names for where, names in store.synced
    )
    assert store.read(d) == data
