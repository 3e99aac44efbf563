"""A blob writer that drops behind (regproxy.store.BlobWriter.drop_behind): the bytes it wrote
leave the page cache once they are on disk, never below the lowest offset a reader still needs,
and the file stays whole.

The page cache is looked at with a ``RWF_NOWAIT`` read (it fails with EAGAIN on a page that is
not cached), on a directory of a real disk: on tmpfs every page is always "cached"."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from regproxy.oci import Digest
from regproxy.page_cache import DROP_LAG, DROP_STEP
from regproxy.store import BlobWriter, Store
from tests.unit.disk import cached

MiB = 1024 * 1024


def write_mib(w: BlobWriter, h: hashlib._Hash, n: int) -> None:
    for _ in range(n):
        chunk = os.urandom(MiB)
        w.write(chunk)
        h.update(chunk)


def test_a_writer_drops_what_is_on_disk_behind_its_readers_and_the_blob_stays_whole(
    disk_dir: Path,
) -> None:
    store = Store(disk_dir / "store")
    store.open()
    w = store.writer()
    reader_at = [0]
    w.drop_behind(lambda: reader_at[0])
    h = hashlib.sha256()
    lag = DROP_LAG // MiB
    write_mib(w, h, lag + 2 * DROP_STEP // MiB)
    # a reader still at 0: nothing goes, however far the writer is ahead
    assert w.dropped == 0
    assert cached(w.path, 0)
    # the reader moved on: up to it (and never into the last DROP_LAG bytes)
    reader_at[0] = w.size - MiB
    write_mib(w, h, DROP_STEP // MiB)
    # (in DROP_STEP steps, at the writeback points)
    assert w.size - DROP_LAG - DROP_STEP < w.dropped <= w.size - DROP_LAG, (w.dropped, w.size)
    assert not cached(w.path, 0) and not cached(w.path, w.dropped - 4096)
    assert cached(w.path, w.size - MiB)
    size = w.size
    w.commit(Digest("sha256", h.hexdigest()))
    blob = store.blob_path(Digest("sha256", h.hexdigest()))
    assert blob.stat().st_size == size
    with open(blob, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == h.hexdigest()


def test_a_writer_that_does_not_drop_keeps_its_pages(disk_dir: Path) -> None:
    """The control: the same bytes without drop_behind stay cached (the probe sees pages)."""
    store = Store(disk_dir / "store")
    store.open()
    w = store.writer()
    write_mib(w, hashlib.sha256(), DROP_LAG // MiB + 2 * DROP_STEP // MiB)
    assert w.dropped == 0
    assert cached(w.path, 0) and cached(w.path, w.size // 2)
    w.abort()


def test_a_rewound_writer_drops_again_from_where_it_was_cut(disk_dir: Path) -> None:
    store = Store(disk_dir / "store")
    store.open()
    w = store.writer(append=True)
    w.drop_behind(lambda: 1 << 62)  # no reader: the writer's lag alone holds pages back
    h = hashlib.sha256()
    write_mib(w, h, 4)
    mark = w.mark()
    hashed = h.copy()
    write_mib(w, h, DROP_LAG // MiB + DROP_STEP // MiB)
    assert w.dropped > 0
    w.rewind(mark)
    h = hashed
    write_mib(w, h, DROP_LAG // MiB + 2 * DROP_STEP // MiB)
    assert not cached(w.path, 4 * MiB)
    w.commit(Digest("sha256", h.hexdigest()))
    with open(store.blob_path(Digest("sha256", h.hexdigest())), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == h.hexdigest()
