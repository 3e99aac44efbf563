"""Bundle import over a registry in-process: what a lying layout cannot make it do."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store

REPO = RepoName("spectro-images/app")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield reg
    await reg.close()


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def digest(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


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
