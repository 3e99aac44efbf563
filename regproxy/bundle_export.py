"""``regproxy export``: images of the store written as one OCI archive (an image layout in a tar),
named so that skopeo (``oci-archive:PATH:REF``), containerd (``ctr images import``) and
``regproxy import`` read them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regproxy.bundle_stage import CONTAINERD_NAME, REF_NAME, BundleError
from regproxy.names import NameResolver, RepoName
from regproxy.oci import OCI_INDEX, Digest, ParsedManifest, parse_manifest
from regproxy.referrers import Referrers
from regproxy.registry import Registry


@dataclass
class ExportImage:
    ref: str  # the reference written into the archive (docker.io/library/nginx:1.25)
    digest: Digest
    media_type: str
    size: int
    #: a signature, SBOM or attestation of an image (named for regproxy import, not containerd)
    referrer: bool = False


def full_reference(repo: RepoName, tag: str | None, digest: Digest) -> str:
    name = f"{repo.host}/{repo.path}" if repo.host else repo.canonical
    return f"{name}:{tag}" if tag else f"{name}@{digest}"


def _platform_matches(desc_platform: dict[str, Any] | None, want: str) -> bool:
    if not desc_platform:
        return False
    parts = want.split("/")
    got = [desc_platform.get("os"), desc_platform.get("architecture"), desc_platform.get("variant")]
    return all(g == w for g, w in zip(got, parts, strict=False))


class Exporter:
    def __init__(
        self,
        registry: Registry,
        resolver: NameResolver,
        *,
        platform: str | None = None,
        referrers: Referrers | None = None,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.platform = platform
        #: when given, each image's referrers (and theirs) are exported with it
        self.referrers = referrers

    async def export(self, refs: list[str], out: Path) -> list[ExportImage]:
        loop = asyncio.get_running_loop()
        entries: list[ExportImage] = []
        blobs: dict[Digest, int] = {}
        manifests: dict[Digest, bytes] = {}
        for ref in refs:
            repo, reference = self.resolver.parse_reference(ref)
            m = await self.registry.get_manifest(repo, reference)
            body, digest, media_type = m.body, m.digest, m.media_type
            parsed = parse_manifest(body, media_type)
            if self.platform and parsed.is_index:
                chosen = [
                    c for c in parsed.manifests if _platform_matches(c.platform, self.platform)
                ]
                if not chosen:
                    raise BundleError(f"{ref}: no manifest for platform {self.platform}")
                child = await self.registry.get_manifest(repo, str(chosen[0].digest))
                body, digest, media_type = child.body, child.digest, child.media_type
                parsed = parse_manifest(body, media_type)
            tag = None if reference.startswith("sha") and ":" in reference else reference
            before = set(manifests)
            await self._collect(repo, digest, body, parsed, manifests, blobs)
            entries.append(
                ExportImage(full_reference(repo, tag, digest), digest, media_type, len(body))
            )
            tree = [str(d) for d in manifests if d not in before]
            entries += await self._attached(repo, tree, manifests, blobs)
        await loop.run_in_executor(None, self._write, out, entries, manifests, blobs)
        return entries

    async def _collect(
        self,
        repo: RepoName,
        digest: Digest,
        body: bytes,
        parsed: ParsedManifest,
        manifests: dict[Digest, bytes],
        blobs: dict[Digest, int],
    ) -> None:
        manifests[digest] = body
        for child in parsed.manifests:
            if self.platform and not _platform_matches(child.platform, self.platform):
                continue
            m = await self.registry.get_manifest(repo, str(child.digest))
            await self._collect(
                repo, m.digest, m.body, parse_manifest(m.body, m.media_type), manifests, blobs
            )
        for b in parsed.blobs:
            blob = await self.registry.get_blob(repo, b.digest)
            if blob.stream is not None:
                await blob.stream.wait_done()
            blobs[b.digest] = b.size

    async def _attached(
        self,
        repo: RepoName,
        tree: list[str],
        manifests: dict[Digest, bytes],
        blobs: dict[Digest, int],
    ) -> list[ExportImage]:
        """The referrers of an image's manifests, as entries named ``host/path@digest`` (or
        cosign's tag, ``host/path:sha256-<hex>.sig``), so that an import restores them."""
        if self.referrers is None or not tree:
            return []
        out = []
        for a in await self.referrers.attached(repo, tree, fetch=True):
            m = await self.registry.get_manifest(repo, a.digest)
            parsed = parse_manifest(m.body, m.media_type)
            await self._collect(repo, m.digest, m.body, parsed, manifests, blobs)
            out.append(
                ExportImage(
                    full_reference(repo, a.tag, m.digest), m.digest, m.media_type, m.size, True
                )
            )
        return out

    def _write(
        self,
        out: Path,
        entries: list[ExportImage],
        manifests: dict[Digest, bytes],
        blobs: dict[Digest, int],
    ) -> None:
        store = self.registry.store
        tmp = out.with_name(f".{out.name}.partial")
        try:
            with tarfile.open(tmp, "w") as tar:
                _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                for digest, body in manifests.items():
                    _add_bytes(tar, f"blobs/{digest.algorithm}/{digest.hex}", body)
                for digest, size in blobs.items():
                    info = tarfile.TarInfo(f"blobs/{digest.algorithm}/{digest.hex}")
                    info.size, info.mode, info.mtime = size, 0o644, 0
                    with open(store.blob_path(digest), "rb") as f:
                        tar.addfile(info, f)
                index = {
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": [
                        {
                            "mediaType": e.media_type,
                            "digest": str(e.digest),
                            "size": e.size,
                            "annotations": (
                                {REF_NAME: e.ref}
                                if e.referrer
                                else {REF_NAME: e.ref, CONTAINERD_NAME: e.ref}
                            ),
                        }
                        for e in entries
                    ],
                }
                _add_bytes(tar, "index.json", json.dumps(index, indent=2).encode())
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))
