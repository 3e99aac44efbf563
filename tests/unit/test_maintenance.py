"""Offline gc and fsck over a store a registry wrote (regproxy.maintenance)."""

from __future__ import annotations

from pathlib import Path

from regproxy.registry import Registry
from tests.unit.local import OCI_MANIFEST, REPO, body, digest


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
