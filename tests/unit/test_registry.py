"""Registry: cached lookups stay right across deletes; uploads racing their own finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from regproxy.errors import BlobUploadUnknown, ManifestUnknown
from regproxy.registry import Registry
from tests.unit.local import OCI_MANIFEST, REPO, body, digest


async def test_blob_lookup_racing_a_delete_does_not_cache_the_deleted_blob(
    registry: Registry,
) -> None:
    data = b"x" * 100
    d = digest(data)
    await registry.uploads.monolithic(REPO, d, body(data), len(data))
    registry.cache.forget(everything=True)  # a cold cache: the lookup goes to the index
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
    registry.cache.forget(everything=True)
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


async def test_a_first_manifest_lookup_brings_its_small_body_along(registry: Registry) -> None:
    """The row and a small manifest's body come from the index reader in one hand-off: the
    body is then in memory, and the GET reads no file. A file gone since the row was written is
    still found out by the body's read, as before."""
    cfg = b"{}"
    cd = digest(cfg)
    await registry.uploads.monolithic(REPO, cd, body(cfg), len(cfg))
    m = (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s",'
        b'"size":2},"layers":[]}' % (OCI_MANIFEST.encode(), str(cd).encode())
    )
    md = digest(m)
    await registry.put_manifest(REPO, "v1", m, OCI_MANIFEST)
    for ref in (str(md), "v1"):
        registry.cache.forget(everything=True)
        found = await registry.local_manifest(REPO, ref)
        assert found is not None and found[0].digest == str(md)
        assert registry.cache.body(str(md)) == m
        assert (await registry.get_manifest(REPO, ref)).body == m
    # the file goes behind the index's back: the row comes without a body, and the read of the
    # body finds the file gone (the manifest is forgotten, not served from memory)
    registry.cache.forget(everything=True)
    registry.store.blob_path(md).unlink()
    found = await registry.local_manifest(REPO, str(md))
    assert found is not None and registry.cache.body(str(md)) is None
    with pytest.raises(ManifestUnknown):  # ManifestGone is one
        await registry.get_manifest(REPO, str(md))
