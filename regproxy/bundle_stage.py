"""Import, phase 1: a bundle's files streamed once into temp files of the store, each hashed.

Nothing here is visible to anyone: staged files live in the store's ``tmp/`` until the importer
(:mod:`regproxy.bundle`) commits them, and :meth:`Stage.discard` removes whatever it did not.
A file named ``blobs/<alg>/<hex>`` must hash to its name; a file whose name is a digest in the
way ``docker save`` and its kin name layers and configs (``<hex>.tar``, ``<hex>.json``,
``sha256:<hex>``) is remembered with that claim, for :mod:`regproxy.bundle_docker` to check.
Also here: the image names a bundle gives (:func:`image_for`), shared by both kinds of bundle.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from regproxy.errors import OCIError, RegproxyError
from regproxy.names import NameResolver, RepoName
from regproxy.oci import MAX_MANIFEST_BYTES, Digest
from regproxy.store import BlobWriter, Store
from regproxy.units import BULK_CHUNK

SMALL_FILE: Final = MAX_MANIFEST_BYTES  # kept in memory too (index.json, manifests, configs)
SMALL_TOTAL: Final = 64 * 1024 * 1024
REF_NAME: Final = "org.opencontainers.image.ref.name"
CONTAINERD_NAME: Final = "io.containerd.image.name"
#: a top-level file named by its sha256 (docker-archive ``<hex>.tar``/``<hex>.json``,
#: go-containerregistry's ``<hex>.tar.gz`` and ``sha256:<hex>``); ``<id>/layer.tar`` is not:
#: that directory is a v1 layer id, not the digest of the file
_NAMED_BY_DIGEST: Final = re.compile(
    r"^(?:sha256:)?([0-9a-f]{64})(?:\.tar|\.tar\.gz|\.tgz|\.json)?\Z"
)

#: tarfile reads an extended header (a GNU long name, PAX records) whole into memory: a bundle's
#: may be this large at most (real ones are a few hundred bytes)
MAX_EXTENDED_HEADER: Final = 1024 * 1024
_EXTENDED: Final = frozenset(
    {tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE}
    | {tarfile.SOLARIS_XHDTYPE}
)

Progress = Callable[[int, int], None]  # (bytes read so far, files staged so far)
#: room for one file before its first byte is written: (its path in the bundle, its size, the
#: bytes of it written so far); blocking, raises (regproxy.space.NoRoom) when there is none
Room = Callable[[str, int, Callable[[], int]], None]


class BundleError(RegproxyError):
    """A bundle that cannot be imported; the message names the image and digest."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Staged:
    digest: Digest
    size: int
    writer: BlobWriter | None  # None: the store had it already


class Stage:
    """Files -> verified temp files. Synchronous: runs in a worker thread."""

    def __init__(
        self,
        store: Store,
        progress: Progress | None,
        room: Room | None = None,
        restage: frozenset[Digest] = frozenset(),
    ) -> None:
        self.store = store
        #: written from the bundle even if the store has them (found evicted by a run before)
        self.restage = restage
        self.progress = progress
        #: asked before each file is written (storage.min_free: regproxy.bundle); None: nobody
        self.room = room
        self.blobs: dict[Digest, Staged] = {}
        self.by_path: dict[str, Digest] = {}
        #: path -> the digest its name claims (top-level files named by a digest)
        self.claims: dict[str, Digest] = {}
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
        elif m := _NAMED_BY_DIGEST.match(path):
            self.claims[path] = Digest("sha256", m.group(1))
        if expected is not None and expected in self.blobs and self.blobs[expected].writer is None:
            # already in the store: read past it (still counted) and keep what we have
            self._skip(f)
            self.by_path[path] = expected
            return
        keep_small = size <= SMALL_FILE and self._small_total + size <= SMALL_TOTAL
        if (
            expected is not None
            and expected not in self.restage
            and self.store.stat(expected) == size
        ):
            # in the store already (an earlier import): hashed, not written, so it takes no room
            self._check_present(path, f, expected, size, bytearray() if keep_small else None)
            return
        buf = bytearray() if keep_small else None
        writer = self.store.writer()
        try:
            if self.room is not None:
                self.room(path, size, lambda: writer.size)
            while chunk := f.read(BULK_CHUNK):
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
        try:
            _verify(path, size, writer.size, expected, actual)
        except BundleError:
            writer.abort()
            raise
        self._keep_small(path, buf)
        self.by_path[path] = actual
        if actual in self.blobs or (
            actual not in self.restage and self.store.stat(actual) == writer.size
        ):
            writer.abort()
            self.blobs.setdefault(actual, Staged(actual, writer.size, None))
        else:
            self.blobs[actual] = Staged(actual, writer.size, writer)

    def _keep_small(self, path: str, buf: bytearray | None) -> None:
        if buf is not None:
            self.small[path] = bytes(buf)
            self._small_total += len(buf)

    def _check_present(
        self, path: str, f: IO[bytes], expected: Digest, size: int, buf: bytearray | None
    ) -> None:
        """A ``blobs/<alg>/<hex>`` file the store holds: its bytes must still hash to its name
        (a damaged bundle is refused all the same), but go nowhere."""
        h = expected.hasher()
        read = 0
        while chunk := f.read(BULK_CHUNK):
            h.update(chunk)
            if buf is not None:
                buf += chunk
            read += len(chunk)
            self.bytes_read += len(chunk)
            self._report()
        _verify(path, size, read, expected, Digest(expected.algorithm, h.hexdigest()))
        self._keep_small(path, buf)
        self.by_path[path] = expected
        self.blobs.setdefault(expected, Staged(expected, size, None))

    @staticmethod
    def _skip(f: IO[bytes]) -> None:
        while f.read(BULK_CHUNK):
            pass

    def bytes_of(self, digest: Digest) -> bytes:
        """A manifest's or config's bytes (refused when too large to be one)."""
        for path, d in self.by_path.items():
            if d == digest and path in self.small:
                return self.small[path]
        size = self.size_of(digest)
        if size is not None and size > MAX_MANIFEST_BYTES:
            # never read a layer whole into memory because the bundle calls it a manifest
            raise BundleError(
                f"{digest} is named as a manifest but is {size} bytes "
                f"(a manifest is at most {MAX_MANIFEST_BYTES})"
            )
        try:
            return self.file_of(digest).read_bytes()
        except FileNotFoundError:  # evicted from the store meanwhile
            raise BundleError(f"{digest} is no longer in the store; import again") from None

    def has(self, digest: Digest) -> bool:
        return digest in self.blobs or self.store.stat(digest) is not None

    def size_of(self, digest: Digest) -> int | None:
        staged = self.blobs.get(digest)
        return staged.size if staged is not None else self.store.stat(digest)

    def file_of(self, digest: Digest) -> Path:
        """Where the bytes are now: the staged temp file, else the store's blob."""
        staged = self.blobs.get(digest)
        if staged is not None and staged.writer is not None:
            return staged.writer.path
        return self.store.blob_path(digest)

    def json_of(self, name: str) -> Any:
        """A small file of the bundle (index.json, manifest.json) as JSON; None if absent."""
        data = self.small.get(name)
        return None if data is None else load_json(data, f"{name} in the bundle")

    def discard(self) -> None:
        for staged in self.blobs.values():
            if staged.writer is not None and not staged.writer.closed:
                staged.writer.abort()
            elif staged.writer is not None:
                staged.writer.path.unlink(missing_ok=True)


def load_json(data: bytes, what: str) -> Any:
    """JSON from a bundle: not JSON, or nested past the parser's depth, is the bundle's fault."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise BundleError(f"{what} is not valid JSON (or nests too deep)") from None


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


class _BoundedTarInfo(tarfile.TarInfo):
    """A bundle's tar headers (``tarinfo=`` of :func:`tarfile.open`): an extended header larger
    than :data:`MAX_EXTENDED_HEADER` is refused before tarfile reads it into memory."""

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> _BoundedTarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _EXTENDED and info.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(f"an extended header of {info.size} bytes")
        return info


def stage_archive(stage: Stage, path: Path) -> None:
    stream, proc = _open_archive(path)
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_BoundedTarInfo) as tar:
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


def stage_directory(stage: Stage, root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                stage.add(str(p.relative_to(root)), f, p.stat().st_size)


def stage_path(stage: Stage, path: Path) -> None:
    if path.is_dir():
        stage_directory(stage, path)
    elif path.is_file():
        stage_archive(stage, path)
    else:
        raise BundleError(f"{path}: no such file or directory")


# --- the names a bundle gives its images ----------------------------------------------------------
@dataclass
class Image:
    """One image to import: where it goes, and what the bundle's index says of its top."""

    repo: RepoName
    tag: str | None
    top: Digest
    size: int | None = None  # the index.json descriptor's size (None: nothing claimed)
    media_type: str | None = None


def image_for(
    resolver: NameResolver, ref: str | None, override: str | None, digest: Digest, where: str
) -> Image:
    tag: str | None = None
    if ref and ("/" in ref or override is None):
        if "/" not in ref and ":" not in ref and override is None:
            raise BundleError(f"{where} is named only {ref!r}: give the image a name with --name")
        repo, reference = resolver.parse_reference(ref)
        tag = None if reference.startswith("sha256:") else reference
        if override:
            repo = resolver.parse_reference(override)[0]
        return Image(repo, tag, digest)
    if override is None:
        raise BundleError(f"{where} ({digest}) has no name: give the image a name with --name")
    repo, reference = resolver.parse_reference(override)
    if ref and ":" not in ref and "/" not in ref:
        tag = ref  # the layout named only a tag: --name gives the repository
    elif ":" in override.rsplit("/", 1)[-1]:
        tag = reference
    return Image(repo, tag, digest)


def _verify(path: str, size: int, read: int, expected: Digest | None, actual: Digest) -> None:
    """A bundle file read whole, to the size its entry states, hashing to its name (if it has one)."""
    if read != size:
        raise BundleError(f"bundle file {path!r} is truncated ({read} of {size} bytes)")
    if expected is not None and actual != expected:
        raise BundleError(f"blob {expected} in the bundle is damaged: its bytes hash to {actual}")
