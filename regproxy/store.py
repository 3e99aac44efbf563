"""The content-addressed blob store on local disk. Synchronous: callers run it off the loop.

LAYOUT_VERSION 1::

    <root>/
      LAYOUT_VERSION          "1"
      index.db (+ -wal, -shm) the metadata index (regproxy.index), not touched here
      blobs/
        sha256/ab/abcdef...   one file per blob or manifest, named by its digest, immutable
        sha512/01/0123...
      tmp/
        <uuid>                uploads in progress and upstream fetches being written;
                              removed at start-up (a crash leaves only these)
      quarantine/             blobs that fsck found damaged, moved aside
      reserve                 RESERVE_BYTES kept back while there is room, given up when the
                              store is opened on a full disk (see Store.open)

Durability order for a new blob: bytes -> fsync(file) -> rename into blobs/ -> fsync(dir).
Only after that does the index get the row that makes it visible.
The store knows nothing of HTTP, repositories or tags.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from regproxy.errors import (
    DigestInvalid,
    DigestMismatch,
    OCIError,
    RegproxyError,
    StorageFull,
    StoreFailed,
)
from regproxy.oci import ALGORITHMS, Digest
from regproxy.page_cache import DropBehind, drop_file, no_reader, start_writeback
from regproxy.units import BULK_CHUNK

LAYOUT_VERSION: Final = 1
#: start writeback every this many bytes, so a commit's fsync of a large blob has little left:
#: after a cold 1 GiB pull 2-6 ms, against 13-40 with 32 MiB (benchmarks/README.md, "Third pass")
WRITEBACK_EVERY: Final = 4 * 1024 * 1024
#: room kept back on the store's filesystem: a start on a full disk gives it up, so the index
#: (its WAL files need room to open at all), eviction and gc can run and make room again
RESERVE_BYTES: Final = 8 * 1024 * 1024
#: the suffix of a committed file's second name in ``tmp/``, kept until its index row is in:
#: ``<temp name>.<algorithm>-<hex>.spare`` (see :func:`spare_digest`)
SPARE: Final = ".spare"
#: the infix of a file moved out of ``blobs/`` by a removal, until it is deleted or put back
OUT: Final = ".out-"
log = logging.getLogger("regproxy.store")


def spare_digest(name: str) -> Digest | None:
    """The digest a spare's name carries (None: not one, or one named without it)."""
    if not name.endswith(SPARE):
        return None
    alg, _, hex_part = name[: -len(SPARE)].rpartition(".")[2].partition("-")
    try:
        return Digest.parse_uncached(f"{alg}:{hex_part}")
    except DigestInvalid:
        return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(exc: OSError, what: str) -> OCIError:
    """A write to our own disk failed: the store's error, never an OSError (which callers
    that also read a socket would take for the source's fault). Full is 507, else 500."""
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left ({code}) while {what}")
    return StoreFailed(f"{code} ({exc.strerror or exc}) while {what}")


class BlobWriter:
    """Bytes on their way into the store: a temp file, hashed as it is written.

    Writes go straight to the file descriptor (no user-space buffer), so a reader that opens
    :attr:`path` sees every byte as soon as :meth:`write` returns. A failed create, write or
    commit raises :class:`StorageFull` (ENOSPC, EDQUOT: 507) or :class:`StoreFailed` (any
    other errno: 500), never an OSError: a caller that also reads a socket (regproxy.fetch)
    must not take this disk's fault for its source's.
    """

    def __init__(
        self, store: Store, path: Path, *, append: bool = False, deferred: bool = False
    ) -> None:
        """``deferred``: open nothing yet (an upload session's file is created by its first
        :meth:`reopen` and closed between requests, so an idle session holds no descriptor)."""
        self.store = store
        self.path = path
        self._fd: int | None = None
        self.size = 0
        #: bytes given to the hash: a commit refuses a file whose size is not this
        self.hashed = 0
        self._flushed = 0
        #: the page cache behind the writer (None: the bytes stay cached; see drop_behind)
        self._drops: DropBehind | None = None
        #: a writeback error a drop was told of (the commit refuses the file)
        self._failed: OCIError | None = None
        #: where :meth:`commit` put the file
        self.committed_path: Path | None = None
        self._hasher: Any = Digest("sha256", "").hasher()
        #: after a commit, a second name of the committed file, kept until :meth:`settle`
        self.spare: Path | None = None
        if deferred:
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_EXCL)
        try:
            self._fd = os.open(path, flags, 0o644)
        except FileExistsError:  # a name taken: the caller's to handle, not a disk fault
            raise
        except OSError as exc:
            raise _disk_error(exc, f"creating {path.name}") from exc
        self.size = os.fstat(self._fd).st_size
        self._flushed = self.size
        if self.size:
            # resumed upload without its hash state (e.g. after a restart): hash what is there
            with open(path, "rb") as f:
                while chunk := f.read(BULK_CHUNK):
                    self._hasher.update(chunk)
                    self.hashed += len(chunk)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_unhashed(data)
        self.hash(data)

    def write_unhashed(self, data: bytes | bytearray | memoryview) -> None:
        """The file half of :meth:`write`; with :meth:`hash` it may run on another thread at
        the same time (both release the GIL), as long as each half keeps the chunk order."""
        assert self._fd is not None, "write after close"
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as exc:
            raise _disk_error(exc, f"writing {self.path.name}") from exc
        self.size += len(data)
        if self.size - self._flushed >= WRITEBACK_EVERY:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing what we wrote so far (non-blocking), so the fsync at
        commit has little left to do; then drop what is behind, if this file does. Linux only;
        elsewhere a no-op."""
        if self._fd is None or not start_writeback(
            self._fd, self._flushed, self.size - self._flushed
        ):
            return
        self._flushed = self.size
        if self._drops is None and self.store.drop_above and self.size > self.store.drop_above:
            self._drops = DropBehind(no_reader)  # a push, an import: nobody reads it before
        if self._drops is None:
            return
        try:
            self._drops.after_writeback(self._fd, self.size)
        except OSError as exc:  # the commit's fsync would not report it again
            self._failed = _disk_error(exc, f"writing {self.path.name}")
            raise self._failed from exc

    def drop_behind(self, floor: Callable[[], int]) -> None:
        """From now on the file's bytes leave the page cache once they are on disk, behind the
        writer and below ``floor()`` (:class:`regproxy.page_cache.DropBehind`)."""
        self._drops = DropBehind(floor)

    @property
    def dropped(self) -> int:
        """Bytes dropped from the page cache behind the writer."""
        return self._drops.dropped if self._drops is not None else 0

    @property
    def drops_behind(self) -> bool:
        """Whether the file drops behind its writer."""
        return self._drops is not None

    def drop_committed(self) -> None:
        """After the commit of a file that dropped behind, once no response reads it as it
        lands: all its pages leave the page cache, the last ones and what slow readers held
        back too (all on disk: the commit's fsync). Any thread."""
        if self._drops is not None and self.committed_path is not None:
            drop_file(self.committed_path)

    def hash(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.hashed += len(data)

    def digest(self, algorithm: str = "sha256") -> Digest:
        if algorithm == "sha256":
            return Digest("sha256", self._hasher.hexdigest())
        h = Digest(algorithm, "").hasher()
        with open(self.path, "rb") as f:
            while chunk := f.read(BULK_CHUNK):
                h.update(chunk)
        return Digest(algorithm, h.hexdigest())

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def reopen(self) -> None:
        """Open the file for appending again after :meth:`close` (creating it if need be)."""
        if self._fd is not None:
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise _disk_error(exc, f"opening {self.path.name}") from exc

    def mark(self) -> tuple[int, Any]:
        """The size and hash state now, for :meth:`rewind`."""
        return self.size, self._hasher.copy()

    def rewind(self, mark: tuple[int, Any]) -> None:
        """Cut the file back to a :meth:`mark`: what was written since is undone."""
        size, hasher = mark
        try:
            os.truncate(self.path, size)
        except FileNotFoundError:
            if size:
                raise
        self.size = self.hashed = size
        self._flushed = min(self._flushed, size)
        if self._drops is not None:
            self._drops.rewind(size)
        self._hasher = hasher.copy()

    def commit(self, expected: Digest, *, source: str = "") -> int:
        """Verify, fsync and move into place; on mismatch delete and raise DigestMismatch."""
        actual = self.digest(expected.algorithm)
        if self._failed is not None:  # the fsync below would not report it again
            self.abort()
            raise self._failed
        if self.hashed != self.size:  # bytes in the file the hash never saw (a write cut short)
            self.abort()
            raise DigestMismatch(
                str(expected), f"{self.size} bytes in the file, {self.hashed} hashed", source
            )
        if actual != expected:
            self.abort()
            raise DigestMismatch(str(expected), str(actual), source)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            os.fsync(self._fd)
            self.close()
            dest = self.store.blob_path(expected)
            dest.parent.mkdir(parents=True, exist_ok=True)
            spare = self.path.with_name(
                f"{self.path.name}.{expected.algorithm}-{expected.hex}{SPARE}"
            )
            os.link(self.path, spare)
            self.spare = spare
            os.replace(self.path, dest)
            self.committed_path = dest
            _fsync_dir(dest.parent)
        except OSError as exc:
            self.abort()
            raise _disk_error(exc, f"committing {expected}") from exc
        return self.size

    def settle(self, digest: Digest) -> None:
        """Once the digest's index row is written: the committed file is put back if a removal
        (in any process) moved it out in between (:mod:`regproxy.removal`), and the spare name
        goes. A put-back that fails is tried once more; then :class:`StorageFull` or
        :class:`StoreFailed`: the file is not in place, and the caller takes its row back."""
        spare, self.spare = self.spare, None
        if spare is None:
            return
        try:
            try:
                self.store.put_back(digest, spare)
            except OSError:  # once more from the spare
                if not self.store.put_back(digest, spare):
                    # in place: put back by another meanwhile, or linked by the first try and
                    # its directory's fsync failed: synced again before the spare goes
                    self.store.sync_dir(self.store.blob_path(digest).parent)
        except OSError as exc:
            raise _disk_error(exc, f"putting {digest} back") from exc
        finally:
            with contextlib.suppress(OSError):  # a spare left: regproxy.removal.settle_spares
                spare.unlink(missing_ok=True)

    def abort(self) -> None:
        self.close()
        for path in (self.path, self.spare):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.spare = None


class StoreLayoutError(RegproxyError):
    """The store was laid out by another (a newer, or an unknown) regproxy: it is refused, and
    left as it is."""

    def __init__(self, root: Path, found: str) -> None:
        super().__init__(root, found)
        self.root = root
        self.found = found

    def __str__(self) -> str:
        return (
            f"store {self.root} has layout version {self.found[:20]!r}, not the "
            f"{LAYOUT_VERSION} this regproxy knows: it was laid out by a newer release; run "
            "that release (or move the store aside to start empty)"
        )


class Store:
    """Blob files by digest under one root. All methods block: run them in an executor."""

    def __init__(self, root: Path, *, drop_above: int = 0) -> None:
        self.root = root
        #: a blob written larger than this leaves the page cache behind its writer (0: none
        #: does; ``storage.drop_behind_above``, see :meth:`BlobWriter.drop_behind`)
        self.drop_above = drop_above
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        self.quarantine = root / "quarantine"

    def open(self, *, sweep: bool = True) -> int:
        """Create the layout and remove partial files a crash left; returns how many. Spares
        are left to :func:`regproxy.removal.settle_spares`, which asks the index."""
        laid_out = self.check()  # before anything is made in a store of another layout
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if not laid_out:
            (self.root / "LAYOUT_VERSION").write_text(f"{LAYOUT_VERSION}\n")
        self._keep_reserve()
        removed = 0
        for entry in self.tmp.iterdir() if sweep else ():
            if spare_digest(entry.name) is not None:
                continue
            if OUT in entry.name:  # a crash mid-removal: the file goes back (gc takes orphans)
                with contextlib.suppress(OSError, DigestInvalid):
                    hex_part = entry.name.split(OUT)[0]
                    alg = next((a for a, n in ALGORITHMS.items() if n == len(hex_part)), "")
                    self.put_back(Digest.parse_uncached(f"{alg}:{hex_part}"), entry)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.info("store.sweep removed=%d root=%s", removed, self.root)
        return removed

    def check(self) -> bool:
        """Refuse another layout; whether ``LAYOUT_VERSION`` is there. Creates nothing (what
        a command that only reads calls instead of :meth:`open`)."""
        version_file = self.root / "LAYOUT_VERSION"
        try:
            found = version_file.read_text().strip()
        except FileNotFoundError:
            return False
        if found != str(LAYOUT_VERSION):
            raise StoreLayoutError(self.root, found)
        return True

    def _keep_reserve(self) -> None:
        """Give the reserve up when the disk is full; make it while there is plenty of room."""
        reserve = self.root / "reserve"
        free = shutil.disk_usage(self.root).free
        if reserve.exists():
            if free < RESERVE_BYTES:
                reserve.unlink()
                log.warning(
                    "store.reserve_released root=%s free=%d bytes=%d: the disk is full; the "
                    "index and eviction take this room, and the reserve comes back at a start "
                    "with room to spare",
                    self.root,
                    free,
                    RESERVE_BYTES,
                )
            return
        if free < 4 * RESERVE_BYTES:
            return
        try:
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another process made it meanwhile
            return
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)  # real blocks, not a sparse file
        except OSError as exc:
            os.close(fd)
            reserve.unlink(missing_ok=True)
            log.info("store.reserve_not_made root=%s error=%s", self.root, exc)
            return
        os.close(fd)

    def sync_dir(self, path: Path) -> None:
        """fsync a directory of the store: the names made in it are durable."""
        _fsync_dir(path)

    def blob_path(self, digest: Digest) -> Path:
        # Digest.parse guarantees [a-z0-9] algorithm and hex: no path can escape the tree
        return self.blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def stat(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, digest: Digest) -> bytes:
        return self.blob_path(digest).read_bytes()

    def write_bytes(self, digest: Digest, data: bytes) -> int:
        """Store a small blob (a manifest) in one go, with the same durability order."""
        if self.stat(digest) == len(data):
            return len(data)
        w = self.writer()
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        size = w.commit(digest)
        w.settle(digest)  # its caller makes sure of it once its row is in (ensure_bytes)
        return size

    def temp_path(self, name: str | None = None) -> Path:
        return self.tmp / (name or uuid.uuid4().hex)

    def writer(
        self, name: str | None = None, *, append: bool = False, deferred: bool = False
    ) -> BlobWriter:
        return BlobWriter(self, self.temp_path(name), append=append, deferred=deferred)

    def temp_size(self, name: str) -> int | None:
        try:
            return self.temp_path(name).stat().st_size
        except FileNotFoundError:
            return None

    def remove_temp(self, name: str) -> None:
        self.temp_path(name).unlink(missing_ok=True)

    def delete(self, digest: Digest) -> bool:
        try:
            self.blob_path(digest).unlink()
            return True
        except FileNotFoundError:
            return False

    def move_out(self, digest: Digest) -> Path | None:
        """First step of a removal (:mod:`regproxy.removal`): the file moved to ``tmp/`` (None:
        there is none)."""
        out = self.tmp / f"{digest.hex}{OUT}{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.blob_path(digest), out)
        except FileNotFoundError:
            return None
        return out

    def missing(self, digest: Digest) -> bool:
        """No file for ``digest``, and no removal has it moved out (it may be put back)."""
        if self.stat(digest) is not None:
            return False
        if any(self.tmp.glob(f"{digest.hex}{OUT}*")):
            return False
        return self.stat(digest) is None  # a put-back links it before it drops the moved name

    def put_back(self, digest: Digest, source: Path) -> bool:
        """Give the file of ``digest`` the name ``source`` has, unless one is in place (any file
        of a digest has its bytes); True if it was put back (and its directory fsynced)."""
        dest = self.blob_path(digest)
        try:
            os.link(source, dest)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not source.exists():
                if dest.exists():
                    return False  # in place already (put back by another)
                raise
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(source, dest)
        # durable before the caller drops the name it came from: after a power loss the file
        # of a digest whose row is durable is in blobs/ (rare: only a digest stored again)
        self.sync_dir(dest.parent)
        log.info("store.put_back digest=%s", digest)
        return True

    def ensure_bytes(self, digest: Digest, data: bytes) -> None:
        """A small file whose index row was just written is still in place (else written);
        a disk fault is :class:`StorageFull` or :class:`StoreFailed`, never an OSError."""
        try:
            if self.stat(digest) != len(data):
                self.write_bytes(digest, data)
        except OSError as exc:
            raise _disk_error(exc, f"writing {digest} again") from exc

    def iter_blobs(self) -> Iterator[tuple[Digest, int]]:
        """Every committed blob (fsck and gc only: the serving path never scans)."""
        for alg in ALGORITHMS:
            base = self.blobs / alg
            if not base.is_dir():
                continue
            for sub in sorted(base.iterdir()):
                for f in sorted(sub.iterdir()):
                    yield Digest(alg, f.name), f.stat().st_size

    def verify(self, digest: Digest) -> bool:
        h = digest.hasher()
        with open(self.blob_path(digest), "rb") as f:
            while chunk := f.read(BULK_CHUNK):
                h.update(chunk)
        return bool(h.hexdigest() == digest.hex)

    def move_aside(self, digest: Digest) -> Path:
        self.quarantine.mkdir(exist_ok=True)
        dest = self.quarantine / f"{digest.algorithm}-{digest.hex}"
        os.replace(self.blob_path(digest), dest)
        return dest

    def disk_usage(self) -> tuple[int, int]:
        """(total, free) bytes of the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
