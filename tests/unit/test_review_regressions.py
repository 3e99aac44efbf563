"""Regressions found in review: races at awaits and error paths of the registry and the fetcher."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.errors import BlobUploadUnknown, OCIError
from regproxy.fetch import Transfer
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import Registry
from regproxy.store import Store

REPO = RepoName("spectro-images/app")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    root = tmp_path / "store"
    reg = Registry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield reg
    await reg.close()


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


async def test_blob_lookup_racing_a_delete_does_not_cache_the_deleted_blob(
    registry: Registry,
) -> None:
    data = b"x" * 100
    d = digest(data)
    await registry.uploads.monolithic(REPO, d, body(data), len(data))
    registry.drop_cached()  # a cold cache: the lookup goes to the index
    # the lookup is queued on the index thread before the delete; it must not re-cache the link
    lookup = asyncio.create_task(registry.local_blob(REPO, d))
    await asyncio.sleep(0)
    await registry.delete_blob(REPO, d)
    await lookup
    assert await registry.local_blob(REPO, d) is None


async def test_manifest_lookup_racing_a_delete_does_not_cache_the_deleted_manifest(
    registry: Registry,
) -> None:
    manifest = b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s","size":2},"layers":[]}'
    cfg = b"{}"
    cd = digest(cfg)
    await registry.uploads.monolithic(REPO, cd, body(cfg), len(cfg))
    m = manifest % (OCI_MANIFEST.encode(), str(cd).encode())
    md = digest(m)
    await registry.put_manifest(REPO, str(md), m, OCI_MANIFEST)
    registry.drop_cached()
    lookup = asyncio.create_task(registry.local_manifest(REPO, str(md)))
    await asyncio.sleep(0)
    await registry.delete_manifest(REPO, str(md))
    await lookup
    assert await registry.local_manifest(REPO, str(md)) is None


async def test_patch_waiting_behind_a_finish_gets_upload_unknown(registry: Registry) -> None:
    data = b"y" * 1000
    uid = await registry.uploads.start(REPO)
    await registry.uploads.append(REPO, uid, body(data[:500]))
    gate = asyncio.Event()

    async def slow_tail() -> AsyncIterator[bytes]:
        await gate.wait()
        yield data[500:]

    finish = asyncio.create_task(registry.uploads.finish(REPO, uid, digest(data), slow_tail()))
    await asyncio.sleep(0.05)  # finish holds the upload's lock
    patch = asyncio.create_task(registry.uploads.append(REPO, uid, body(b"more")))
    cancel = asyncio.create_task(registry.uploads.cancel(REPO, uid))
    await asyncio.sleep(0.05)
    gate.set()
    assert await finish == len(data)
    with pytest.raises(BlobUploadUnknown):
        await patch
    with pytest.raises(BlobUploadUnknown):
        await cancel
    assert registry.store.stat(digest(data)) == len(data)  # the committed blob is untouched


async def test_reader_of_a_transfer_whose_temp_file_is_gone_gets_an_oci_error(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "store")
    store.open()
    t = Transfer(digest(b"z" * 10), store)
    t.writer = store.writer()
    t.size = 10
    t.writer.abort()  # a failed transfer removed its temp file before publishing the failure
    with pytest.raises(OCIError):
        async for _ in t.read_range(0, 9):
            pass


async def test_bundle_index_naming_a_huge_blob_is_refused_without_reading_it(
    registry: Registry, tmp_path: Path
) -> None:
    """index.json that points at a 40 MB layer as its image: refused as a bad bundle, with
    memory flat (the 'manifest' is never read whole into memory)."""
    import json
    import os
    import tracemalloc

    from regproxy.bundle import BundleError, Importer
    from regproxy.config import load_config
    from regproxy.names import NameResolver

    layout = tmp_path / "layout"
    big = os.urandom(40 * 1024 * 1024)
    d = digest(big)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "blobs" / "sha256" / d.hex).write_bytes(big)
    del big
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": str(d),
                "size": 40 * 1024 * 1024,
                "annotations": {"org.opencontainers.image.ref.name": "docker.io/x/y:1"},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))
    importer = Importer(registry, NameResolver(load_config(None, env={})))
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=str(d)):
            await importer.import_path(layout)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1024 * 1024, peak


async def test_gc_of_a_deleted_manifest_keeps_the_file_of_a_blob_with_the_same_digest(
    registry: Registry, tmp_path: Path
) -> None:
    """Bundle import indexes every manifest as a blob of its repository too. After a DELETE of
    the manifest, gc drops the manifest; the blob row (recent, so kept) must keep its file:
    never an index row without its bytes."""
    from regproxy.config import load_config
    from regproxy.fsck import fsck
    from regproxy.maintenance import gc

    cfg = b"{}"
    await registry.uploads.monolithic(REPO, digest(cfg), body(cfg), len(cfg))
    m = (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s",'
        b'"size":2},"layers":[]}' % (OCI_MANIFEST.encode(), str(digest(cfg)).encode())
    )
    md = digest(m)
    await registry.index_blob(REPO, md, len(m))  # as bundle import does for every manifest
    await registry.put_manifest(REPO, str(md), m, OCI_MANIFEST)
    await registry.delete_manifest(REPO, str(md))
    config = load_config(None, env={"REGPROXY_STORAGE_ROOT": str(registry.store.root)})
    report = await gc(config)
    assert [d for d, _ in report.manifests] == [str(md)]
    assert str(md) not in [d for d, _ in report.blobs]  # recent: the blob row stays
    assert registry.store.stat(md) == len(m), "gc removed the file of a blob it kept"
    assert not (await fsck(config)).damaged
