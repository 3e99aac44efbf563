"""Bundle import over a registry in-process: what a lying layout cannot make it do."""

from __future__ import annotations

from pathlib import Path

import pytest

from regproxy.registry import Registry
from tests.unit.local import OCI_MANIFEST, digest


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
