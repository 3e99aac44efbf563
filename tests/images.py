"""Make real OCI image layouts on disk (tar layers, config, manifest, index) for tests.

Images are built here from random bytes so each test has content nobody else has; real tools
(skopeo, ctr) then read and copy them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    return gzip.compress(buf.getvalue(), mtime=0)


@dataclass
class Image:
    manifest: bytes
    config: bytes
    layers: list[bytes]

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(
    arch: str = "amd64", layer_sizes: tuple[int, ...] = (2048, 70_000), seed: bytes | None = None
) -> Image:
    seed = seed or os.urandom(8)
    layers = []
    diff_ids = []
    for i, size in enumerate(layer_sizes):
        payload = hashlib.shake_256(seed + bytes([i])).digest(size)
        raw_files = {f"data/{arch}-{i}.bin": payload}
        blob = layer_tar(raw_files)
        layers.append(blob)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, content in raw_files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(content), 0, 0o644
                tar.addfile(info, io.BytesIO(content))
        diff_ids.append(sha256(gzip.decompress(blob)))
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        },
        sort_keys=True,
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER_GZ, "digest": sha256(b), "size": len(b)} for b in layers
            ],
        },
        indent=2,
    ).encode()
    return Image(manifest, config, layers)


def _write_blob(layout: Path, data: bytes) -> None:
    d = sha256(data).split(":")[1]
    p = layout / "blobs" / "sha256" / d
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def write_layout(layout: Path, images: dict[str, Image | tuple[bytes, list[Image]]]) -> None:
    """An OCI image layout; each tag maps to an image or to (index bytes, its images)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    entries = []
    for tag, item in images.items():
        if isinstance(item, Image):
            imgs, top, mt = [item], item.manifest, OCI_MANIFEST
        else:
            top, imgs = item
            mt = OCI_INDEX
        for img in imgs:
            for blob in (img.manifest, img.config, *img.layers):
                _write_blob(layout, blob)
        _write_blob(layout, top)
        entries.append(
            {
                "mediaType": mt,
                "digest": sha256(top),
                "size": len(top),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        )
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})
    )


def make_index(images: dict[str, Image]) -> bytes:
    """An OCI index over images keyed by architecture."""
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": img.digest,
                    "size": len(img.manifest),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for arch, img in images.items()
            ],
        },
        indent=2,
    ).encode()
