"""A manifest PUT refused after its file was placed (its blob gone between the reference check
and the row: add_manifest's second check) takes its file away again, unless another index row
stores the digest or it was there before (in-process registry)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.errors import ManifestBlobUnknown
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry
from regproxy.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = b'{"architecture":"amd64","os":"linux"}'
BODY = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(Digest.of(CONFIG)),
            "size": len(CONFIG),
        },
        "layers": [],
    }
).encode()
DIGEST = Digest.of(BODY)


class RacingStore(Store):
    """Runs ``before_write`` once, on the executor thread, as a manifest's bytes are written:
    the moment between the PUT's reference check and its index row."""

    before_write: Callable[[], None] | None = None

    def write_bytes(self, digest: Digest, data: bytes) -> int:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        return super().write_bytes(digest, data)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    root = tmp_path / "store"
    reg = LocalRegistry(RacingStore(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield reg
    await reg.close()


async def with_config(reg: LocalRegistry, repo: RepoName) -> None:
    await asyncio.to_thread(reg.store.write_bytes, Digest.of(CONFIG), CONFIG)
    await reg.index_blob(repo, Digest.of(CONFIG), len(CONFIG))


def unlinked_by_another_connection(root: Path, repo: RepoName) -> Callable[[], None]:
    """What a DELETE of the blob (or eviction) does from elsewhere: its row in ``repo`` goes."""

    def unlink() -> None:
        ix = Index(root / "index.db")
        try:
            assert ix.unlink_blob(repo.canonical, str(Digest.of(CONFIG)))
        finally:
            ix.close()

    return unlink


async def refused(reg: LocalRegistry, repo: RepoName) -> None:
    store = reg.store
    assert isinstance(store, RacingStore)
    store.before_write = unlinked_by_another_connection(store.root, repo)
    with pytest.raises(ManifestBlobUnknown):
        await reg.put_manifest(repo, "v1", BODY, OCI_MANIFEST)
    assert store.before_write is None  # the race happened
    assert await reg.db.read(Index.manifest_in_repo, repo.canonical, str(DIGEST)) is None


async def test_the_file_of_a_refused_put_is_removed(registry: LocalRegistry) -> None:
    repo = RepoName("spectro-images/team/app")
    await with_config(registry, repo)
    await refused(registry, repo)
    assert registry.store.stat(DIGEST) is None
    assert list(registry.store.tmp.iterdir()) == []


async def test_a_file_another_repository_stores_stays(registry: LocalRegistry) -> None:
    other, repo = RepoName("spectro-images/team/other"), RepoName("spectro-images/team/app")
    for r in (other, repo):
        await with_config(registry, r)
    await registry.put_manifest(other, "v1", BODY, OCI_MANIFEST)
    await refused(registry, repo)
    assert registry.store.stat(DIGEST) == len(BODY)
    assert (await registry.get_manifest(other, "v1")).body == BODY


async def test_an_orphan_that_was_there_before_is_left_to_gc(registry: LocalRegistry) -> None:
    """A file no row stores, placed before this PUT (a crash, an older refusal): gc's to take,
    not this PUT's (another writer of it may be on its way)."""
    repo = RepoName("spectro-images/team/app")
    await with_config(registry, repo)
    await asyncio.to_thread(registry.store.write_bytes, DIGEST, BODY)
    await refused(registry, repo)
    assert registry.store.stat(DIGEST) == len(BODY)
