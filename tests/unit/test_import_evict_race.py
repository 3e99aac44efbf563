"""An import that relies on a blob the store already holds, and eviction striking between its
scan and its commit: never a manifest whose blob is gone (in-process, the interleaving forced
by a store that evicts from another index connection at the moment the import writes its
manifest: after the blob checks, before the manifest's row)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.bundle import BundleError, Importer, ImportStopped
from regproxy.config import load_config
from regproxy.errors import StorageFull
from regproxy.evict_batch import evict_loose, evict_lru
from regproxy.index import Index
from regproxy.names import NameResolver, RepoName
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry
from regproxy.store import Store
from tests.unit.local import OCI_MANIFEST, digest

CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
LAYER = b"a layer both images share" * 1000
OLD = RepoName("spectro-images/docker.io/team/old")
NEW = RepoName("spectro-images/docker.io/team/new")


class RacingStore(Store):
    """Runs ``before_write`` right before a manifest's bytes are written (between the
    registry's reference check and the manifest's row), on the executor thread."""

    before_write: Callable[[], None] | None = None
    once = True

    def write_bytes(self, digest: Digest, data: bytes) -> int:
        hook = self.before_write
        if hook is not None:
            if self.once:
                self.before_write = None
            hook()
        return super().write_bytes(digest, data)


def manifest(config: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": str(digest(config)),
                "size": len(config),
            },
            "layers": [{"mediaType": LAYER_TYPE, "digest": str(digest(LAYER)), "size": len(LAYER)}],
        }
    ).encode()


def layout(root: Path, config: bytes) -> tuple[Path, Digest]:
    """An OCI layout of one image (``docker.io/team/new:1``) with the shared layer."""
    body = manifest(config)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for data in (config, LAYER, body):
        (blobs / digest(data).hex).write_bytes(data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": str(digest(body)),
                "size": len(body),
                "annotations": {"org.opencontainers.image.ref.name": "docker.io/team/new:1"},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    return root, digest(body)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[LocalRegistry]:
    root = tmp_path / "store"
    reg = LocalRegistry(RacingStore(root), AsyncIndex(root / "index.db"))
    await reg.open()
    # what the store held before: an unpinned image with the layer (evictable)
    config = b'{"old": true}'
    for data in (config, LAYER):
        reg.store.write_bytes(digest(data), data)
        await reg.index_blob(OLD, digest(data), len(data))
    await reg.put_manifest(OLD, "v1", manifest(config), OCI_MANIFEST, pinned=False)
    yield reg
    await reg.close()


def evict_units(root: Path, store: Store) -> None:
    """The daemon's evictor (or ``regproxy gc``), from another connection: every unpinned
    unit's rows in one batch, then the files."""
    ix = Index(root / "index.db")
    try:
        batch = evict_lru(ix, 10**12, (float("-inf"), "", ""), now=4e9, in_use=0.0, busy=())
    finally:
        ix.close()
    for d in batch.files:
        store.delete(Digest.parse(d))


def evict_loose_content(root: Path, store: Store) -> None:
    """Loose content (nothing references it), however recent."""
    ix = Index(root / "index.db")
    try:
        batch = evict_loose(ix, 10**12, "", before=4e9, busy=())
    finally:
        ix.close()
    for d in batch.files:
        store.delete(Digest.parse(d))


async def consistent(reg: LocalRegistry) -> None:
    """Every manifest a repository holds has every blob it lists, row and file."""
    pairs = reg.db.read(
        lambda ix: ix.db.execute(
            "SELECT r.repo, x.child FROM repo_manifests r "
            "JOIN manifest_refs x ON x.parent = r.digest AND x.kind = 'blob'"
        ).fetchall()
    )
    for repo, child in await pairs:
        size = await reg.db.read(Index.blob_in_repo, repo, child)
        assert size is not None, (repo, child)
        assert reg.store.stat(Digest.parse(child)) == size, (repo, child)


async def test_a_blob_evicted_between_scan_and_commit_is_staged_again(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    store = registry.store
    assert isinstance(store, RacingStore)
    path, top = layout(tmp_path / "bundle", b'{"new": true}')
    store.before_write = lambda: evict_units(tmp_path / "store", store)
    importer = Importer(registry, NameResolver(load_config(None, env={})))
    summary = await importer.import_path(path)
    assert store.before_write is None  # the eviction struck mid-import
    assert await registry.local_manifest(OLD, "v1") is None  # the old image went
    found = await registry.local_manifest(NEW, "1")
    assert found is not None and found[0].digest == str(top)
    layer = await registry.get_blob(NEW, digest(LAYER))
    assert layer.size == len(LAYER) and store.stat(digest(LAYER)) == len(LAYER)
    assert summary.images == ["spectro-images/docker.io/team/new:1"]
    await consistent(registry)


async def test_a_blob_evicted_every_time_fails_the_import_with_nothing_broken(
    registry: LocalRegistry, tmp_path: Path
) -> None:
    store = registry.store
    assert isinstance(store, RacingStore)
    path, top = layout(tmp_path / "bundle", b'{"new": true}')
    store.once = False
    store.before_write = lambda: evict_loose_content(tmp_path / "store", store)
    importer = Importer(registry, NameResolver(load_config(None, env={})))
    config = digest(b'{"new": true}')
    with pytest.raises(BundleError, match=f"{config} was evicted .* import the bundle again"):
        await importer.import_path(path)
    assert await registry.local_manifest(NEW, "1") is None
    assert await registry.local_manifest(NEW, str(top)) is None
    assert await registry.local_manifest(OLD, "v1") is not None  # nothing else lost
    await consistent(registry)


class FullAt(AsyncIndex):
    """The index fills as the manifest ``target`` is written the second time (the import's
    second run): StorageFull, as :func:`regproxy.index.call` raises it on SQLITE_FULL."""

    target = ""
    seen = 0

    async def write(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if fn is Index.add_manifest and args[1].digest == self.target:
            self.seen += 1
            if self.seen == 2:
                raise StorageFull("the metadata index could not be written: disk is full")
        return await super().write(fn, *args, **kwargs)


async def test_an_index_full_in_the_second_run_counts_what_the_first_run_imported(
    tmp_path: Path,
) -> None:
    """A bundle of two images, A and NEW (NEW needs the layer the store holds): the first run
    commits A, then finds the layer evicted; the second run fills the index at A. A was
    imported (by the first run) and says so; NEW was not."""
    root = tmp_path / "store"
    reg = LocalRegistry(RacingStore(root), FullAt(root / "index.db"))
    await reg.open()
    try:
        config = b'{"old": true}'
        for data in (config, LAYER):
            reg.store.write_bytes(digest(data), data)
            await reg.index_blob(OLD, digest(data), len(data))
        await reg.put_manifest(OLD, "v1", manifest(config), OCI_MANIFEST, pinned=False)
        path, _ = layout(tmp_path / "bundle", b'{"new": true}')
        a_config, a_layer = b'{"a": true}', b"a layer of its own" * 100
        a = json.loads(manifest(a_config))
        a["layers"] = [{"mediaType": LAYER_TYPE, "digest": str(digest(a_layer)), "size": 1800}]
        a_body = json.dumps(a).encode()
        for data in (a_config, a_layer, a_body):
            (path / "blobs" / "sha256" / digest(data).hex).write_bytes(data)
        index = json.loads((path / "index.json").read_text())
        ref = {"org.opencontainers.image.ref.name": "docker.io/team/a:1"}
        entry = {"mediaType": OCI_MANIFEST, "digest": str(digest(a_body)), "size": len(a_body)}
        index["manifests"].insert(0, {**entry, "annotations": ref})
        (path / "index.json").write_text(json.dumps(index))
        assert isinstance(reg.store, RacingStore) and isinstance(reg.db, FullAt)
        reg.store.before_write = lambda: evict_units(root, reg.store)  # at A's manifest
        reg.db.target = str(digest(a_body))
        importer = Importer(reg, NameResolver(load_config(None, env={})))
        with pytest.raises(ImportStopped) as stopped:
            await importer.import_path(path)
        assert stopped.value.http_status == 507
        assert stopped.value.summary.images == ["spectro-images/docker.io/team/a:1"]
        assert stopped.value.left == ["spectro-images/docker.io/team/new:1"]
        detail = str(stopped.value.detail)
        assert "imported before it: 1 image(s) (spectro-images/docker.io/team/a:1)" in detail
        assert await reg.local_manifest(RepoName("spectro-images/docker.io/team/a"), "1")
        assert await reg.local_manifest(NEW, "1") is None
    finally:
        await reg.close()
