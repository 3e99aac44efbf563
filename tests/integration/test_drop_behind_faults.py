"""A writer that drops behind (regproxy.store.BlobWriter.drop_behind) on a disk whose writeback
fails: the failure is the writer's (507 / 500), never a committed file of wrong bytes.

The drop waits for the writeback of its range (``sync_file_range`` with the wait flags), and a
wait reports a writeback error to its file descriptor once: the commit's ``fsync`` on the same
descriptor no longer sees it, and the pages ``POSIX_FADV_DONTNEED`` then drops are read back
from the disk (here: zeros). The disk is an ext4 on a loop device whose backing file is on a
small tmpfs: writes land in the page cache, and their writeback fails while the tmpfs is full
(needs root to mount and attach; everything is detached by the test, also when it fails)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from regproxy.errors import StorageFull, StoreFailed
from regproxy.oci import Digest
from regproxy.page_cache import DROP_LAG, DROP_STEP
from regproxy.store import Store

pytestmark = pytest.mark.process  # mounts, attaches a loop device, makes a filesystem
MiB = 1024 * 1024


def _run(*argv: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, capture_output=True, check=False, timeout=60)


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a directory on the loop device's ext4, the tmpfs its backing file is on)."""
    missing = [tool for tool in ("mount", "losetup", "mkfs.ext4") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)} here")
    backing, mnt = tmp_path / "backing", tmp_path / "disk"
    backing.mkdir()
    mnt.mkdir()
    r = _run("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(backing))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr!r}")
    loop = ""
    try:
        image = backing / "disk.img"
        with open(image, "wb") as f:
            f.truncate(256 * MiB)  # sparse: its blocks are taken from the tmpfs as written
        # no journal: a failed journal write would turn the filesystem read-only
        r = _run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(image))
        assert r.returncode == 0, r.stderr
        r = _run("losetup", "-f", "--show", str(image))
        if r.returncode != 0:
            pytest.skip(f"cannot attach a loop device here: {r.stderr!r}")
        loop = r.stdout.decode().strip()
        r = _run("mount", loop, str(mnt))
        assert r.returncode == 0, r.stderr
        try:
            yield mnt, backing
        finally:
            _run("umount", str(mnt))
    finally:
        if loop:
            _run("losetup", "-d", loop)
        _run("umount", "-l", str(backing))


def test_a_writeback_error_behind_the_writer_fails_it_and_nothing_wrong_is_committed(
    failing_disk: tuple[Path, Path],
) -> None:
    mnt, backing = failing_disk
    store = Store(mnt / "store")
    store.open()
    os.sync()  # the store's own files are on the disk before its backing fills
    free = os.statvfs(backing).f_bavail * os.statvfs(backing).f_frsize
    filler = backing / "filler"
    with open(filler, "wb") as f:  # ~4 MiB left: the writer's first bytes fail writeback
        f.write(b"\1" * max(0, free - 4 * MiB))
    w = store.writer()
    w.drop_behind(lambda: 1 << 62)  # no reader holds anything back
    h = hashlib.sha256()

    def write_mib(n: int) -> None:
        for _ in range(n):
            chunk = os.urandom(MiB)
            w.write(chunk)
            h.update(chunk)

    write_mib(DROP_STEP // MiB)  # the bytes the first drop will take
    probe = os.open(w.path, os.O_RDONLY)
    try:  # their writeback is over, and failed (another descriptor: the writer's is told too)
        with pytest.raises(OSError):
            os.fdatasync(probe)
    finally:
        os.close(probe)
    filler.unlink()  # the disk recovers: the next writebacks (and the commit's fsync) succeed
    failed: BaseException | None = None
    try:
        write_mib(DROP_LAG // MiB + DROP_STEP // MiB)
    except (StorageFull, StoreFailed) as exc:
        failed = exc
    digest = Digest("sha256", h.hexdigest())
    if failed is None:
        try:
            w.commit(digest)
        except (StorageFull, StoreFailed) as exc:
            failed = exc
    else:
        w.abort()
    blob = store.blob_path(digest)
    if blob.exists():
        with open(blob, "rb") as f:
            back = hashlib.sha256(f.read()).hexdigest()
        assert back == digest.hex, "a blob committed under a digest its bytes do not have"
    assert failed is not None, "the writeback error went unnoticed"
    # (StorageFull here: this kernel's loop device passes the backing file's ENOSPC on)
    assert not w.path.exists()
