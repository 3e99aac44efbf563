"""Import, ``docker save`` archives (and the docker-archive of skopeo, podman and crane): one OCI
manifest synthesized per image, once every claim the archive makes about its own bytes holds.

A docker archive names no layer by the digest a registry would use, so nothing downstream could
catch a damaged layer: it would be stored under the digest of its damaged bytes, and containerd
would fail at unpack. What the archive claims, and what is checked here (after staging, before
anything is committed, so a refusal leaves the store as it was):

- ``manifest.json``: per image, its config file and its layer files, in order;
- each file's name, where the name is a digest (``<hex>.json``, ``<hex>.tar``, ``<hex>.tar.gz``,
  ``sha256:<hex>``; ``blobs/sha256/<hex>`` was checked while staging): the bytes hash to it;
- the config's ``rootfs.diff_ids``: one per layer, the digest of the layer's uncompressed tar.
  An uncompressed layer must hash to it; a gzip or zstd layer is decompressed as a stream (bounded
  memory, one pass) and its output hashed. bzip2 and xz layers are refused: no OCI layer media
  type carries them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import zlib
from pathlib import Path
from typing import Any, Final

from regproxy.bundle_stage import BundleError, Image, Stage, image_for, load_json
from regproxy.errors import OCIError
from regproxy.names import NameResolver
from regproxy.oci import OCI_MANIFEST, Digest
from regproxy.units import BULK_CHUNK

OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"
#: a layer's compression (sniffed from its first bytes) -> the media type it is stored under
LAYER_TYPES: Final = {
    "tar": OCI_LAYER_TAR,
    "gzip": OCI_LAYER_TAR + "+gzip",
    "zstd": OCI_LAYER_TAR + "+zstd",
}
_MAGIC: Final = (
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def compression_of(path: Path) -> str:
    """``tar`` (uncompressed), ``gzip``, ``zstd``, ``bzip2`` or ``xz``, by the file's magic."""
    with open(path, "rb") as f:
        head = f.read(6)
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), "tar")


def uncompressed_digest(path: Path, kind: str, what: str) -> Digest:
    """The sha256 of a gzip or zstd file's decompressed bytes, streamed (never whole in memory)."""
    h = hashlib.sha256()
    if kind == "gzip":
        try:
            with gzip.open(path, "rb") as g:
                while chunk := g.read(BULK_CHUNK):
                    h.update(chunk)
        except (OSError, EOFError, zlib.error) as exc:
            raise BundleError(f"{what} is not valid gzip: {exc}") from None
        return Digest("sha256", h.hexdigest())
    if kind != "zstd":
        raise BundleError(
            f"{what} is {kind}-compressed: an OCI layer is tar, tar+gzip or tar+zstd "
            "(recompress the archive's layers)"
        )
    try:
        proc = subprocess.Popen(
            ["zstd", "-dcq", str(path)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except FileNotFoundError:
        raise BundleError(f"{what} is zstd-compressed and the zstd tool is missing") from None
    with proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(BULK_CHUNK):
            h.update(chunk)
    if proc.returncode != 0:
        raise BundleError(f"{what} is not valid zstd (zstd exited with {proc.returncode})")
    return Digest("sha256", h.hexdigest())


def _file(stage: Stage, path: Any, where: str, what: str) -> Digest:
    """The digest of a file manifest.json names; refused if missing or if its name lies."""
    if not isinstance(path, str) or path not in stage.by_path:
        raise BundleError(f"{where}: {what} {path!r} is missing from the archive")
    actual = stage.by_path[path]
    claimed = stage.claims.get(path)
    if claimed is not None and claimed != actual:
        raise BundleError(
            f"{where}: {what} {path!r} is damaged: its name says {claimed}, "
            f"its bytes hash to {actual}"
        )
    return actual


def _diff_ids(config: Any, where: str) -> list[Digest]:
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) for d in ids):
        raise BundleError(f"{where}: the config has no rootfs.diff_ids list")
    try:
        return [Digest.parse(d) for d in ids]
    except OCIError as exc:
        raise BundleError(f"{where}: the config's rootfs.diff_ids has {exc}") from None


class _DiffIds:
    """Each layer's (compression, diff_id), worked out once per layer digest."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        self._known: dict[Digest, tuple[str, Digest]] = {}

    def of(self, layer: Digest, what: str) -> tuple[str, Digest]:
        known = self._known.get(layer)
        if known is None:
            path = self.stage.file_of(layer)
            kind = compression_of(path)
            diff_id = layer if kind == "tar" else uncompressed_digest(path, kind, what)
            known = self._known[layer] = (kind, diff_id)
        return known


def images_from_docker(
    stage: Stage, resolver: NameResolver, override: str | None
) -> tuple[list[Image], dict[Digest, bytes]]:
    """The images of a docker archive, each with its synthesized OCI manifest (digest -> bytes).
    Blocking (reads and decompresses staged layers): run it off the event loop."""
    entries = stage.json_of("manifest.json")
    if not isinstance(entries, list) or not entries:
        raise BundleError("the docker archive has no usable manifest.json")
    diff_ids = _DiffIds(stage)
    images: list[Image] = []
    synthesized: dict[Digest, bytes] = {}
    for i, entry in enumerate(entries):
        where = f"manifest.json entry {i}"
        if not isinstance(entry, dict):
            raise BundleError(f"{where} is not an object")
        cfg_path = entry.get("Config")
        cfg_digest = _file(stage, cfg_path, where, "config")
        claimed = _diff_ids(load_json(stage.bytes_of(cfg_digest), f"{where}: config"), where)
        layer_paths = entry.get("Layers") or []
        if not isinstance(layer_paths, list):
            raise BundleError(f"{where}: Layers is not a list")
        if len(layer_paths) != len(claimed):
            raise BundleError(
                f"{where}: {len(layer_paths)} layer file(s), but the config's rootfs.diff_ids "
                f"lists {len(claimed)}"
            )
        layers = []
        for k, (lp, diff_id) in enumerate(zip(layer_paths, claimed, strict=True)):
            digest = _file(stage, lp, where, "layer")
            kind, actual = diff_ids.of(digest, f"{where}: layer {lp!r}")
            if actual != diff_id:
                how = "bytes" if kind == "tar" else f"{kind}-decompressed bytes"
                raise BundleError(
                    f"{where}: layer {lp!r} is damaged: its {how} hash to {actual}, "
                    f"the config's rootfs.diff_ids[{k}] is {diff_id}"
                )
            layers.append(
                {
                    "mediaType": LAYER_TYPES[kind],
                    "digest": str(digest),
                    "size": stage.size_of(digest),
                }
            )
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": str(cfg_digest),
                    "size": stage.size_of(cfg_digest),
                },
                "layers": layers,
            },
            indent=2,
        ).encode()
        md = Digest.of(manifest)
        synthesized[md] = manifest
        tags = entry.get("RepoTags") or [None]
        if not isinstance(tags, list) or not all(t is None or isinstance(t, str) for t in tags):
            raise BundleError(f"{where}: RepoTags is not a list of names")
        for ref in tags:
            images.append(image_for(resolver, ref, override, md, where))
    return images, synthesized
