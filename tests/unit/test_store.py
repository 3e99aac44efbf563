"""regproxy.store: temp file -> hash -> fsync -> rename; nothing partial is ever visible."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from regproxy.errors import DigestMismatch
from regproxy.oci import Digest
from regproxy.store import LAYOUT_VERSION, Store, StoreLayoutError


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.open()
    return s


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_open_creates_layout(tmp_path: Path) -> None:
    s = Store(tmp_path / "new")
    assert s.open() == 0
    assert (s.root / "blobs").is_dir() and (s.root / "tmp").is_dir()
    assert (s.root / "LAYOUT_VERSION").read_text().strip() == str(LAYOUT_VERSION)
    assert s.open() == 0  # idempotent


def test_open_refuses_other_layout(tmp_path: Path) -> None:
    s = Store(tmp_path / "old")
    s.open()
    (s.root / "LAYOUT_VERSION").write_text("999\n")
    with pytest.raises(StoreLayoutError, match="999"):
        s.open()


def test_open_sweeps_tmp(store: Store) -> None:
    data = b"committed"
    w = store.writer()
    w.write(data)
    w.commit(Digest.of(data))
    w.settle(Digest.of(data))
    # what a crash leaves: partial writes, a dot file, a directory
    (store.tmp / "partial").write_bytes(b"half")
    (store.tmp / ".hidden").write_bytes(b"x")
    (store.tmp / "dir").mkdir()
    (store.tmp / "dir" / "f").write_bytes(b"y")
    w2 = store.writer("upload-1")
    w2.write(b"never finished")
    w2.close()
    assert store.open() == 4
    assert list(store.tmp.iterdir()) == []
    assert store.read(Digest.of(data)) == data  # committed blobs are untouched


def test_commit(store: Store) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = Digest.of(data)
    w = store.writer()
    assert store.stat(digest) is None
    for i in range(0, len(data), 1 << 20):
        w.write(data[i : i + (1 << 20)])
    assert w.size == len(data)
    assert w.path.parent == store.tmp
    # nothing visible before commit
    assert store.stat(digest) is None
    assert w.commit(digest) == len(data)
    assert w.closed
    assert store.stat(digest) == len(data)
    assert store.read(digest) == data
    assert store.blob_path(digest) == store.blobs / "sha256" / digest.hex[:2] / digest.hex
    # a second name is kept until the index row is in: then the file is checked, and it goes
    assert w.spare is not None and w.spare.parent == store.tmp
    store.delete(digest)  # a removal in another process took it meanwhile
    w.settle(digest)
    assert store.read(digest) == data  # put back
    assert list(store.tmp.iterdir()) == []
    assert store.verify(digest)


def test_commit_sha512(store: Store) -> None:
    data = b"sha512 content"
    digest = Digest("sha512", hashlib.sha512(data).hexdigest())
    w = store.writer()
    w.write(data)
    w.commit(digest)
    assert store.blob_path(digest).parent.parent.name == "sha512"
    assert store.read(digest) == data
    assert list(store.iter_blobs()) == [(digest, len(data))]


def test_commit_mismatch_leaves_nothing(store: Store) -> None:
    before = files(store.root)
    w = store.writer()
    w.write(b"actual bytes")
    wrong = Digest.of(b"expected bytes")
    with pytest.raises(DigestMismatch) as info:
        w.commit(wrong, source="test")
    assert info.value.expected == str(wrong)
    assert info.value.actual == str(Digest.of(b"actual bytes"))
    assert "test" in str(info.value)
    assert store.stat(wrong) is None
    assert store.stat(Digest.of(b"actual bytes")) is None
    assert files(store.root) == before
    assert list(store.tmp.iterdir()) == []


def test_bytes_in_the_file_the_hash_never_saw_are_not_committed(store: Store) -> None:
    # a write cut short after its bytes reached the file (a pace check, a disk error), then the
    # rest appended by a next source: the hash covers exactly the blob, the file holds more
    body = b"0123456789" * 100
    w = store.writer()
    w.write(body[:400])
    w.write_unhashed(body[400:500])  # in the file, never hashed
    w.write(body[400:])
    with pytest.raises(DigestMismatch) as info:
        w.commit(Digest.of(body), source="test")
    assert "1100 bytes in the file, 1000 hashed" in str(info.value)
    assert store.stat(Digest.of(body)) is None
    assert list(store.tmp.iterdir()) == []


def test_abort_leaves_nothing(store: Store) -> None:
    before = files(store.root)
    w = store.writer()
    w.write(b"x" * 100_000)
    assert w.path.exists()
    w.abort()
    assert not w.path.exists()
    w.abort()  # twice is fine
    assert files(store.root) == before


def test_writer_bytes_visible_while_writing(store: Store) -> None:
    """Followers tail the temp file: every write is on disk when write() returns."""
    w = store.writer()
    w.write(b"abc")
    assert w.path.read_bytes() == b"abc"
    w.write(memoryview(b"def"))
    assert w.path.read_bytes() == b"abcdef"
    w.abort()


def test_resumed_writer_hashes_what_is_there(store: Store) -> None:
    data = b"first half|second half"
    w = store.writer("resume")
    w.write(data[:11])
    w.close()
    w2 = store.writer("resume", append=True)
    assert w2.size == 11
    w2.write(data[11:])
    assert w2.commit(Digest.of(data)) == len(data)
    assert store.read(Digest.of(data)) == data


def test_writer_names_are_unique(store: Store) -> None:
    w = store.writer("same")
    with pytest.raises(FileExistsError):
        store.writer("same")
    w.abort()


def test_write_bytes(store: Store) -> None:
    data = b'{"schemaVersion":2}'
    digest = Digest.of(data)
    assert store.write_bytes(digest, data) == len(data)
    assert store.write_bytes(digest, data) == len(data)  # again: no-op
    assert store.read(digest) == data
    with pytest.raises(DigestMismatch):
        store.write_bytes(Digest.of(b"other"), data)
    assert list(store.tmp.iterdir()) == []


def test_delete_and_quarantine(store: Store) -> None:
    a, b = b"aaa", b"bbb"
    for data in (a, b):
        store.write_bytes(Digest.of(data), data)
    assert store.delete(Digest.of(a))
    assert not store.delete(Digest.of(a))
    dest = store.move_aside(Digest.of(b))
    assert dest.read_bytes() == b
    assert store.stat(Digest.of(b)) is None
    assert list(store.iter_blobs()) == []


def test_verify_detects_damage(store: Store) -> None:
    data = b"intact"
    digest = Digest.of(data)
    store.write_bytes(digest, data)
    store.blob_path(digest).write_bytes(b"damaged")
    assert not store.verify(digest)


def test_temp_helpers(store: Store) -> None:
    assert store.temp_size("nope") is None
    w = store.writer("t1")
    w.write(b"12345")
    assert store.temp_size("t1") == 5
    store.remove_temp("t1")
    store.remove_temp("t1")
    assert store.temp_size("t1") is None
    w.close()
