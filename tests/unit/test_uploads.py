"""Upload sessions (regproxy.uploads): no descriptor while idle, a cap, nothing left by failures."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    RangeNotSatisfiable,
    StorageFull,
    TooManyRequests,
)
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store

REPO = RepoName("spectro-images/app")


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"), max_upload_sessions=3)
    await reg.open()
    yield reg
    await reg.close()


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def temp_files(reg: Registry) -> list[str]:
    return sorted(p.name for p in reg.store.tmp.iterdir())


def open_files_under(path: Path) -> list[str]:
    """This process's descriptors that point under ``path``."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


async def test_an_idle_session_holds_no_descriptor(registry: Registry) -> None:
    tmp = registry.store.tmp
    uid = await registry.uploads.start(REPO)
    assert temp_files(registry) == []  # a POST creates no file
    await registry.uploads.append(REPO, uid, body(b"a" * 1000))
    assert temp_files(registry) == [uid]
    assert open_files_under(tmp) == []  # between requests the file is closed
    await registry.uploads.append(REPO, uid, body(b"b" * 24), start=1000, end=1023)
    assert open_files_under(tmp) == []
    data = b"a" * 1000 + b"b" * 24
    assert await registry.uploads.finish(REPO, uid, digest(data), body()) == len(data)
    assert registry.store.stat(digest(data)) == len(data)
    assert temp_files(registry) == []


async def test_a_session_without_chunks_commits_the_empty_blob(registry: Registry) -> None:
    uid = await registry.uploads.start(REPO)
    assert await registry.uploads.finish(REPO, uid, digest(b""), None) == 0
    assert registry.store.stat(digest(b"")) == 0


async def test_sessions_above_the_cap_are_refused(registry: Registry) -> None:
    uids = [await registry.uploads.start(REPO) for _ in range(3)]
    with pytest.raises(TooManyRequests) as info:
        await registry.uploads.start(REPO)
    assert info.value.http_status == 429 and info.value.code == "TOOMANYREQUESTS"
    await registry.uploads.cancel(REPO, uids[0])
    await registry.uploads.start(REPO)  # a slot is free again
    assert len(registry.uploads) == 3


async def test_a_post_on_a_full_disk_leaves_nothing(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = registry.db.write

    async def full(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is Index.add_upload:
            raise StorageFull("no space left while adding an upload")
        return await real_write(fn, *args, **kwargs)

    monkeypatch.setattr(registry.db, "write", full)
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(StorageFull):
        await registry.uploads.start(REPO)
    assert len(registry.uploads) == 0
    assert temp_files(registry) == []
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_a_chunk_that_fails_half_way_is_undone(registry: Registry) -> None:
    uid = await registry.uploads.start(REPO)
    await registry.uploads.append(REPO, uid, body(b"x" * 100))

    async def broken() -> AsyncIterator[bytes]:
        yield b"y" * (2 * 1024 * 1024)  # past the write buffer: bytes reach the file
        raise ConnectionResetError("client hung up")

    with pytest.raises(ConnectionResetError):
        await registry.uploads.append(REPO, uid, broken())
    assert registry.uploads.offset(REPO, uid) == 100
    assert (registry.store.tmp / uid).stat().st_size == 100
    with pytest.raises(RangeNotSatisfiable):
        await registry.uploads.append(REPO, uid, body(b"z"), start=5, end=5)
    await registry.uploads.append(REPO, uid, body(b"z" * 10), start=100, end=109)
    data = b"x" * 100 + b"z" * 10
    assert await registry.uploads.finish(REPO, uid, digest(data), None) == len(data)


async def test_a_bad_digest_ends_the_session_and_its_file(registry: Registry) -> None:
    uid = await registry.uploads.start(REPO)
    await registry.uploads.append(REPO, uid, body(b"abc"))
    with pytest.raises(DigestInvalid):
        await registry.uploads.finish(REPO, uid, digest(b"other"), None)
    assert temp_files(registry) == []
    with pytest.raises(BlobUploadUnknown):
        registry.uploads.offset(REPO, uid)


async def test_expiry_removes_idle_sessions_and_their_files(registry: Registry) -> None:
    uid = await registry.uploads.start(REPO)
    await registry.uploads.append(REPO, uid, body(b"abc"))
    assert await registry.uploads.expire(3600) == 0
    assert await registry.uploads.expire(-1) == 1  # every session is older than "now + 1s"
    assert temp_files(registry) == []
    assert await registry.db.read(Index.upload_ids) == set()
