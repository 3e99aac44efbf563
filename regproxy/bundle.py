"""Content bundles: OCI layouts and archives, and ``docker save`` archives, in; OCI archives out.

Import in two phases, so a damaged bundle leaves nothing behind:

1. *stage*: every file of the bundle is streamed once (never whole in memory) into a temp file
   of the store while it is hashed; a blob whose bytes do not match its name is refused there.
2. *check*: every image's graph (index -> manifests -> config and layers) is resolved against
   what was staged and what the store already holds; a missing piece is refused, naming the
   image and the digest.
3. *commit*: only then are blobs moved into place and indexed, children before parents, and
   tags last (the store's durability order); everything imported is pinned.

Staged files that were not needed are removed whatever happens.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from regproxy.errors import OCIError, RegproxyError
from regproxy.index import ManifestRow
from regproxy.names import NameResolver, RepoName
from regproxy.oci import (
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    ParsedManifest,
    parse_manifest,
)
from regproxy.registry import Registry
from regproxy.store import BlobWriter, Store

log = logging.getLogger("regproxy.bundle")
READ: Final = 1024 * 1024
SMALL_FILE: Final = MAX_MANIFEST_BYTES  # kept in memory too (index.json, manifests, configs)
SMALL_TOTAL: Final = 64 * 1024 * 1024
REF_NAME: Final = "org.opencontainers.image.ref.name"
CONTAINERD_NAME: Final = "io.containerd.image.name"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR: Final = "application/vnd.oci.image.layer.v1.tar"


class BundleError(RegproxyError):
    """A bundle that cannot be imported; the message names the image and digest."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class ImportSummary:
    images: list[str] = field(default_factory=list)
    manifests_new: int = 0
    blobs_new: int = 0
    blobs_present: int = 0
    bytes_new: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "manifests_new": self.manifests_new,
            "blobs_new": self.blobs_new,
            "blobs_present": self.blobs_present,
            "bytes_new": self.bytes_new,
            "bytes_read": self.bytes_read,
            "seconds": round(self.seconds, 3),
            "nothing_new": self.blobs_new == 0 and self.manifests_new == 0,
        }

    def __str__(self) -> str:
        what = "nothing new" if self.blobs_new == 0 and self.manifests_new == 0 else "imported"
        return (
            f"{what}: {len(self.images)} image(s), {self.manifests_new} new manifest(s), "
            f"{self.blobs_new} new blob(s) ({self.bytes_new} bytes), "
            f"{self.blobs_present} already present, in {self.seconds:.1f}s"
        )


Progress = Callable[[int, int], None]  # (bytes read so far, files staged so far)


@dataclass
class _Staged:
    digest: Digest
    size: int
    writer: BlobWriter | None  # None: the store had it already


@dataclass
class _Image:
    repo: RepoName
    tag: str | None
    top: Digest


class _Stage:
    """Phase 1, synchronous (runs in a worker thread): files -> verified temp files."""

    def __init__(self, store: Store, progress: Progress | None) -> None:
        self.store = store
        self.progress = progress
        self.blobs: dict[Digest, _Staged] = {}
        self.by_path: dict[str, Digest] = {}
        self.small: dict[str, bytes] = {}
        self._small_total = 0
        self.bytes_read = 0
        self._last_report = 0.0

    def _report(self) -> None:
        if self.progress is not None and time.monotonic() - self._last_report > 0.5:
            self._last_report = time.monotonic()
            self.progress(self.bytes_read, len(self.by_path))

    def add(self, path: str, f: IO[bytes], size: int) -> None:
        """Stage one file; a ``blobs/<alg>/<hex>`` path must hash to its name."""
        path = path.lstrip("./") if path.startswith("./") else path
        expected: Digest | None = None
        parts = path.split("/")
        if len(parts) == 3 and parts[0] == "blobs":
            try:
                expected = Digest.parse(f"{parts[1]}:{parts[2]}")
            except OCIError:
                raise BundleError(f"bundle file {path!r} is not named by a digest") from None
        if expected is not None and expected in self.blobs and self.blobs[expected].writer is None:
            # already in the store: read past it (still counted) and keep what we have
            self._skip(f)
            self.by_path[path] = expected
            return
        keep_small = size <= SMALL_FILE and self._small_total + size <= SMALL_TOTAL
        buf = bytearray() if keep_small else None
        writer = self.store.writer()
        try:
            while chunk := f.read(READ):
                writer.write(chunk)
                if buf is not None:
                    buf += chunk
                self.bytes_read += len(chunk)
                self._report()
            writer.close()
            actual = writer.digest(expected.algorithm if expected else "sha256")
        except BaseException:
            writer.abort()
            raise
        if writer.size != size:
            writer.abort()
            raise BundleError(f"bundle file {path!r} is truncated ({writer.size} of {size} bytes)")
        if expected is not None and actual != expected:
            writer.abort()
            raise BundleError(
                f"blob {expected} in the bundle is damaged: its bytes hash to {actual}"
            )
        if buf is not None:
            self.small[path] = bytes(buf)
            self._small_total += len(buf)
        self.by_path[path] = actual
        if actual in self.blobs or self.store.stat(actual) == writer.size:
            writer.abort()
            self.blobs.setdefault(actual, _Staged(actual, writer.size, None))
        else:
            self.blobs[actual] = _Staged(actual, writer.size, writer)

    @staticmethod
    def _skip(f: IO[bytes]) -> None:
        while f.read(READ):
            pass

    def bytes_of(self, digest: Digest) -> bytes:
        for path, d in self.by_path.items():
            if d == digest and path in self.small:
                return self.small[path]
        staged = self.blobs.get(digest)
        size = staged.size if staged is not None else self.store.stat(digest)
        if size is not None and size > MAX_MANIFEST_BYTES:
            # never read a layer whole into memory because the bundle calls it a manifest
            raise BundleError(
                f"{digest} is named as a manifest but is {size} bytes "
                f"(a manifest is at most {MAX_MANIFEST_BYTES})"
            )
        if staged is not None and staged.writer is not None:
            return staged.writer.path.read_bytes()
        return self.store.read(digest)

    def has(self, digest: Digest) -> bool:
        return digest in self.blobs or self.store.stat(digest) is not None

    def discard(self) -> None:
        for staged in self.blobs.values():
            if staged.writer is not None and not staged.writer.closed:
                staged.writer.abort()
            elif staged.writer is not None:
                staged.writer.path.unlink(missing_ok=True)


def _open_archive(path: Path) -> tuple[IO[bytes], subprocess.Popen[bytes] | None]:
    """The archive as an uncompressed tar stream (gzip by tarfile, zstd by the zstd tool)."""
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    magic = f.read(4)
    f.seek(0)
    if magic == b"\x28\xb5\x2f\xfd":
        f.close()
        try:
            proc = subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE)
        except FileNotFoundError:
            raise BundleError(f"{path} is zstd-compressed and the zstd tool is missing") from None
        assert proc.stdout is not None
        return proc.stdout, proc
    return f, None


def stage_archive(stage: _Stage, path: Path) -> None:
    stream, proc = _open_archive(path)
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    stage.add(member.name, f, member.size)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleError(f"{path} is not a readable tar archive: {exc}") from None
    finally:
        stream.close()
        if proc is not None:
            proc.wait(10)
            if proc.returncode not in (0, None):
                raise BundleError(f"{path}: zstd failed with {proc.returncode}")


def stage_directory(stage: _Stage, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                stage.add(str(p.relative_to(root)), f, p.stat().st_size)


def stage_path(stage: _Stage, path: Path) -> None:
    if path.is_dir():
        stage_directory(stage, path)
    elif path.is_file():
        stage_archive(stage, path)
    else:
        raise BundleError(f"{path}: no such file or directory")


# --- phase 2: the images in the bundle -----------------------------------------------------------
def _json(stage: _Stage, name: str) -> Any:
    data = stage.small.get(name)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError:
        raise BundleError(f"{name} in the bundle is not valid JSON") from None


def _images_from_oci(stage: _Stage, resolver: NameResolver, override: str | None) -> list[_Image]:
    index = _json(stage, "index.json")
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list):
        raise BundleError("the bundle has no usable index.json")
    images = []
    for i, desc in enumerate(index["manifests"]):
        digest = Digest.parse(str(desc.get("digest", "")))
        ann = desc.get("annotations") or {}
        ref = ann.get(CONTAINERD_NAME) or ann.get(REF_NAME)
        images.append(_image_for(resolver, ref, override, digest, f"index.json entry {i}"))
    return images


def _image_for(
    resolver: NameResolver, ref: str | None, override: str | None, digest: Digest, where: str
) -> _Image:
    tag: str | None = None
    if ref and ("/" in ref or override is None):
        if "/" not in ref and ":" not in ref and override is None:
            raise BundleError(f"{where} is named only {ref!r}: give the image a name with --name")
        repo, reference = resolver.parse_reference(ref)
        tag = None if reference.startswith("sha256:") else reference
        if override:
            repo = resolver.parse_reference(override)[0]
        return _Image(repo, tag, digest)
    if override is None:
        raise BundleError(f"{where} ({digest}) has no name: give the image a name with --name")
    repo, reference = resolver.parse_reference(override)
    if ref and ":" not in ref and "/" not in ref:
        tag = ref  # the layout named only a tag: --name gives the repository
    elif ":" in override.rsplit("/", 1)[-1]:
        tag = reference
    return _Image(repo, tag, digest)


def _images_from_docker(
    stage: _Stage, resolver: NameResolver, override: str | None
) -> tuple[list[_Image], dict[Digest, bytes]]:
    """``docker save`` / docker-archive: synthesize an OCI manifest per image."""
    entries = _json(stage, "manifest.json")
    if not isinstance(entries, list):
        raise BundleError("the docker archive has no usable manifest.json")
    images: list[_Image] = []
    synthesized: dict[Digest, bytes] = {}
    for i, entry in enumerate(entries):
        cfg_path = entry.get("Config")
        if cfg_path not in stage.by_path:
            raise BundleError(
                f"manifest.json entry {i}: config {cfg_path!r} is missing from the archive"
            )
        cfg_digest = stage.by_path[cfg_path]
        layers = []
        for lp in entry.get("Layers") or []:
            if lp not in stage.by_path:
                raise BundleError(
                    f"manifest.json entry {i}: layer {lp!r} is missing from the archive"
                )
            ld = stage.by_path[lp]
            layers.append(
                {"mediaType": OCI_LAYER_TAR, "digest": str(ld), "size": stage.blobs[ld].size}
            )
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": OCI_CONFIG,
                    "digest": str(cfg_digest),
                    "size": stage.blobs[cfg_digest].size,
                },
                "layers": layers,
            },
            indent=2,
        ).encode()
        md = Digest.of(manifest)
        synthesized[md] = manifest
        tags = entry.get("RepoTags") or [None]
        for ref in tags:
            images.append(_image_for(resolver, ref, override, md, f"manifest.json entry {i}"))
    return images, synthesized


@dataclass
class _Graph:
    """What one image needs: manifests (children first) and blobs."""

    manifests: list[tuple[Digest, bytes, ParsedManifest]] = field(default_factory=list)
    blobs: dict[Digest, int] = field(default_factory=dict)


def _walk(stage: _Stage, image: _Image, extra: dict[Digest, bytes]) -> _Graph:
    graph = _Graph()
    seen: set[Digest] = set()
    label = f"{image.repo.canonical}:{image.tag or image.top}"

    def visit(digest: Digest, depth: int) -> None:
        if digest in seen:
            return
        seen.add(digest)
        if depth > 4:
            raise BundleError(f"{label}: manifests nest too deep at {digest}")
        if digest in extra:
            body = extra[digest]
        elif stage.has(digest):
            body = stage.bytes_of(digest)
        else:
            raise BundleError(f"{label}: manifest {digest} is missing from the bundle")
        try:
            parsed = parse_manifest(body, None)
        except OCIError as exc:
            raise BundleError(f"{label}: manifest {digest} is invalid: {exc.detail}") from None
        for child in parsed.manifests:
            visit(child.digest, depth + 1)
        for blob in parsed.blobs:
            if not stage.has(blob.digest):
                raise BundleError(f"{label}: blob {blob.digest} is missing from the bundle")
            graph.blobs[blob.digest] = blob.size
        graph.manifests.append((digest, body, parsed))

    visit(image.top, 0)
    return graph


class Importer:
    def __init__(
        self,
        registry: Registry,
        resolver: NameResolver,
        *,
        name: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.name = name
        self.progress = progress

    async def import_path(self, path: Path) -> ImportSummary:
        import asyncio

        loop = asyncio.get_running_loop()
        started = time.monotonic()
        stage = _Stage(self.registry.store, self.progress)
        try:
            await loop.run_in_executor(None, stage_path, stage, path)
            summary = await self._commit(stage, loop)
        finally:
            await loop.run_in_executor(None, stage.discard)
        summary.seconds = time.monotonic() - started
        summary.bytes_read = stage.bytes_read
        log.info(
            "import.done path=%s images=%d blobs_new=%d blobs_present=%d bytes_new=%d seconds=%.1f",
            path,
            len(summary.images),
            summary.blobs_new,
            summary.blobs_present,
            summary.bytes_new,
            summary.seconds,
        )
        return summary

    async def import_stream(self, chunks: AsyncIterator[bytes]) -> ImportSummary:
        """An uploaded bundle: streamed to a temp file of the store, imported, removed."""
        import asyncio

        loop = asyncio.get_running_loop()
        writer = await loop.run_in_executor(None, self.registry.store.writer)
        try:
            buf = bytearray()
            async for chunk in chunks:
                buf += chunk
                if len(buf) >= READ:
                    data, buf = bytes(buf), bytearray()
                    await loop.run_in_executor(None, writer.write, data)
            if buf:
                await loop.run_in_executor(None, writer.write, bytes(buf))
            writer.close()
            return await self.import_path(writer.path)
        finally:
            await loop.run_in_executor(None, writer.abort)

    async def _commit(self, stage: _Stage, loop: Any) -> ImportSummary:
        extra: dict[Digest, bytes] = {}
        try:
            if "index.json" in stage.small:
                images = _images_from_oci(stage, self.resolver, self.name)
            elif "manifest.json" in stage.small:
                images, extra = _images_from_docker(stage, self.resolver, self.name)
            else:
                raise BundleError(
                    "not a bundle: no index.json (OCI) and no manifest.json (docker save)"
                )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            # index.json / manifest.json of an unexpected shape: the bundle's fault, not ours
            raise BundleError(f"the bundle's index is malformed: {exc!r}") from None
        except OCIError as exc:  # a bad name or digest in the index
            raise BundleError(f"the bundle's index names something invalid: {exc}") from None
        graphs = [await loop.run_in_executor(None, _walk, stage, img, extra) for img in images]
        # everything is verified and complete: commit
        summary = ImportSummary()
        committed: set[Digest] = set()
        for img, graph in zip(images, graphs, strict=True):
            for digest, size in graph.blobs.items():
                await self._commit_blob(stage, img.repo, digest, size, committed, summary, loop)
            for digest, body, parsed in graph.manifests:
                if digest not in extra:
                    await self._commit_blob(
                        stage, img.repo, digest, len(body), committed, summary, loop, count=False
                    )
                is_top = digest == img.top
                ref = img.tag if (is_top and img.tag) else str(digest)
                before = await self.registry.local_manifest(img.repo, ref)
                await self.registry.put_manifest(
                    img.repo, ref, body, parsed.media_type, verify_refs=True, pinned=True
                )
                if before is None or not _same(before[0], digest):
                    summary.manifests_new += 1
            summary.images.append(
                f"{img.repo.canonical}{':' + img.tag if img.tag else '@' + str(img.top)}"
            )
        return summary

    async def _commit_blob(
        self,
        stage: _Stage,
        repo: RepoName,
        digest: Digest,
        size: int,
        committed: set[Digest],
        summary: ImportSummary,
        loop: Any,
        *,
        count: bool = True,
    ) -> None:
        staged = stage.blobs.get(digest)
        if staged is not None and staged.writer is not None and digest not in committed:
            writer = staged.writer
            await loop.run_in_executor(None, lambda: writer.commit(digest, source="bundle"))
            staged.writer = None
            committed.add(digest)
            if count:
                summary.blobs_new += 1
                summary.bytes_new += size
        elif count and digest not in committed:
            summary.blobs_present += 1
            committed.add(digest)
        await self.registry.index_blob(repo, digest, size)


def _same(row: ManifestRow, digest: Digest) -> bool:
    return row.digest == str(digest)


# --- export ------------------------------------------------------------------------------------------
@dataclass
class ExportImage:
    ref: str  # the reference written into the archive (docker.io/library/nginx:1.25)
    digest: Digest
    media_type: str
    size: int


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
        self, registry: Registry, resolver: NameResolver, *, platform: str | None = None
    ) -> None:
        self.registry = registry
        self.resolver = resolver
        self.platform = platform

    async def export(self, refs: list[str], out: Path) -> list[ExportImage]:
        import asyncio

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
            await self._collect(repo, digest, body, parsed, manifests, blobs)
            entries.append(
                ExportImage(full_reference(repo, tag, digest), digest, media_type, len(body))
            )
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
                            "annotations": {REF_NAME: e.ref, CONTAINERD_NAME: e.ref},
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
