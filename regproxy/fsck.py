"""``regproxy fsck [--repair]``: re-hash everything the index says the store holds.

fsck walks the index (every stored digest, in keyset pages: memory stays flat) and hashes the
files on a few threads at once, a batch of files per task; a large file is read ahead on one
thread while the previous chunk is hashed on another, so reading and hashing overlap, and on a
large store the small files are hashed in worker processes, one per core (the benchmark
compares it with ``sha256sum`` on the same files). It runs beside a working daemon:

* a file that is missing or does not hash to its name is **checked again** before it is called
  damaged: if the index no longer stores the digest (evicted, collected meanwhile) or the file
  hashes right now (fetched again meanwhile) it is not damage;
* plain ``fsck`` changes nothing: it opens the index on readers only (no writer: an index of an
  older schema is refused, not upgraded; a missing one is not created), prints what it found,
  with the manifests that reference it, and exits 1;
* ``fsck --repair`` removes each damaged digest from the index (its blob row and repository
  links; a manifest also its repository rows, tags and references), in a transaction that
  checks once more that the row is still there and the file is still the one found damaged (same
  inode and mtime), then moves the file to ``quarantine/``; the next pull fetches it again. It
  never removes what the daemon changed meanwhile.

It also recounts the index's running totals from the rows and reports a difference; ``--repair``
rebuilds them (this holds the index's writer for as long as the recount takes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from regproxy import hash_files, schema
from regproxy.async_index import AsyncIndex
from regproxy.config import Config
from regproxy.hash_files import Found, hash_small_files
from regproxy.index import Index, Totals
from regproxy.oci import Digest
from regproxy.progress import Progress, rate
from regproxy.store import Store
from regproxy.store_open import open_store
from regproxy.units import BULK_CHUNK

log = logging.getLogger("regproxy.fsck")
#: stored digests read per index query
PAGE: Final = 1000
#: a hashing task: this many files, or this many bytes (per-file costs are what count at a
#: million small files: a task, its future and the loop's wake-up are paid once per batch)
BATCH_FILES: Final = 512
BATCH_BYTES: Final = 64 * 1024 * 1024
#: stores of this many files or more hash their small files in worker processes (starting them
#: costs ~50 ms each: below this the one thread is as quick)
PROCESSES_FROM: Final = 20_000
#: files larger than this are read ahead on another thread while the last chunk is hashed
READ_AHEAD_ABOVE: Final = 8 * 1024 * 1024

#: (inode, size, mtime_ns): which file was hashed
Ident = tuple[int, int, int]


@dataclass(frozen=True, slots=True)
class Hashed:
    digest: str
    hexdigest: str | None  # None: no such file
    size: int
    ident: Ident | None

    @property
    def ok(self) -> bool:
        return self.hexdigest is not None and self.hexdigest == self.digest.partition(":")[2]


@dataclass(slots=True)
class Tally:
    """What one batch found: files and bytes hashed, and what did not hash to its name (only
    those are handed back one by one)."""

    files: int = 0
    bytes: int = 0
    suspicious: list[Hashed] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.files += other.files
        self.bytes += other.bytes
        self.suspicious += other.suspicious


def _ident(st: os.stat_result) -> Ident:
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_ahead(f: Any, h: Any, reader: ThreadPoolExecutor) -> int:
    """Hash ``f`` with the next chunk read on ``reader`` while this one is hashed."""
    bufs = (bytearray(BULK_CHUNK), bytearray(BULK_CHUNK))
    total, i = 0, 0
    pending = reader.submit(f.readinto, bufs[0])
    while n := pending.result():
        current = memoryview(bufs[i])[:n]
        i ^= 1
        pending = reader.submit(f.readinto, bufs[i])
        h.update(current)  # releases the GIL: the read above goes on meanwhile
        total += n
    return total


def hash_file(
    path: Path, algorithm: str, reader: ThreadPoolExecutor | None = None
) -> tuple[str | None, int, Ident | None]:
    """(hex digest, bytes read, identity) of a file; (None, 0, None) when it is not there."""
    try:
        with open(path, "rb", buffering=0) as f:
            st = os.fstat(f.fileno())
            h = hashlib.new(algorithm)
            if reader is not None and st.st_size > READ_AHEAD_ABOVE:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                n = _read_ahead(f, h, reader)
            else:
                buf = bytearray(min(BULK_CHUNK, max(st.st_size, 1)))
                view, n = memoryview(buf), 0
                while k := f.readinto(buf):
                    h.update(view[:k])
                    n += k
            return h.hexdigest(), n, _ident(st)
    except FileNotFoundError:
        return None, 0, None


class Hasher:
    """Hashes batches of stored digests on its own threads (each with a read-ahead helper).

    Batches of small files go to one thread of their own: hashing one is a few microseconds
    of Python around an open, a read and a close, and two threads doing that hand the GIL to
    each other at every call (on 2 quiet cores 0.72-0.87 s instead of 0.53-0.61 s for 38,539
    files); on a large store they go to worker processes instead (:meth:`use_processes`), which
    share no GIL with anything. A large file's hash lets the GIL go, so those share ``workers``
    threads."""

    def __init__(self, store: Store, workers: int) -> None:
        self.store = store
        self.workers = workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="regproxy-fsck")
        self.small = ThreadPoolExecutor(1, thread_name_prefix="regproxy-fsck-small")
        self.readers = ThreadPoolExecutor(workers, thread_name_prefix="regproxy-fsck-read")
        self.processes: Workers | None = None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.small.shutdown(wait=True)
        self.readers.shutdown(wait=True)

    async def use_processes(self, count: int) -> None:
        """Hash batches of small files in ``count`` worker processes of their own (see
        :mod:`regproxy.hash_files`); where a host cannot start them, the thread does it."""
        workers = Workers(str(self.store.blobs))
        try:
            await workers.start(count)
        except OSError as e:  # no room for a process, no interpreter to run
            log.warning("fsck.no_processes error=%r: small files hashed on one thread", e)
            await workers.close()
            return
        self.processes = workers

    def hash_batch(self, items: list[tuple[str, int]]) -> Tally:
        """Hash each file; the small ones with one read and no stat (per-file cost is what
        counts at a million small files), a large one in chunks, read ahead."""
        tally = Tally()
        small = [item for item in items if item[1] < BULK_CHUNK]
        if small:
            tally.add(_tally(hash_small_files(str(self.store.blobs), small)))
        for d, size in items:
            if size < BULK_CHUNK:
                continue
            tally.files += 1
            h = Hashed(
                d,
                *hash_file(
                    self.store.blob_path(Digest.parse(d)), d.partition(":")[0], self.readers
                ),
            )
            tally.bytes += h.size
            if not h.ok:
                tally.suspicious.append(h)
        return tally

    def identify(self, digest: str) -> Hashed:
        """Hash one file and say which file it was (inode, size, mtime): a second look."""
        d = Digest.parse(digest)
        got, n, ident = hash_file(self.store.blob_path(d), d.algorithm, self.readers)
        return Hashed(digest, got, n, ident)

    async def run(self, items: list[tuple[str, int]]) -> Tally:
        loop = asyncio.get_running_loop()
        if not all(size < BULK_CHUNK for _, size in items):
            return await loop.run_in_executor(self.pool, self.hash_batch, items)
        if (workers := self.processes) is not None:
            try:
                return _tally(await workers.hash(items))
            except WorkerGone as e:  # killed (the OOM killer, a signal) or broken
                if self.processes is workers:  # the first batch to find out
                    log.warning("fsck.worker_gone error=%s: small files on one thread now", e)
                    self.processes = None
                    await workers.close()
        return await loop.run_in_executor(self.small, self.hash_batch, items)

    async def aclose(self) -> None:
        if self.processes is not None:
            await self.processes.close()
        self.close()


def _tally(found: tuple[int, int, list[Found]]) -> Tally:
    files, size, suspicious = found
    return Tally(files, size, [Hashed(d, got, n, None) for d, got, n in suspicious])


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended already
        proc.kill()


class WorkerGone(Exception):
    """A worker process ended or answered what it should not."""


class Workers:
    """Worker processes hashing batches of small files (:func:`regproxy.hash_files.serve`),
    each busy with one batch at a time."""

    def __init__(self, blobs: str) -> None:
        self.blobs = blobs
        self.all: list[asyncio.subprocess.Process] = []
        #: the workers free for a batch; None once closed (each waiter passes it on)
        self.idle: asyncio.Queue[asyncio.subprocess.Process | None] = asyncio.Queue()

    async def start(self, count: int) -> None:
        for _ in range(count):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                hash_files.__file__,
                self.blobs,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.all.append(proc)
            self.idle.put_nowait(proc)

    async def hash(self, items: list[tuple[str, int]]) -> tuple[int, int, list[Found]]:
        proc = await self.idle.get()
        if proc is None:  # closed: the next one waiting is told as well
            self.idle.put_nowait(None)
            raise WorkerGone("closed")
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write("".join(f"{d} {n}\n" for d, n in items).encode() + b"\n")
            await proc.stdin.drain()
            files, size, count = (int(x) for x in (await proc.stdout.readline()).split())
            found: list[Found] = []
            for _ in range(count):
                d, got, n = (await proc.stdout.readline()).decode().split()
                found.append((d, None if got == "-" else got, int(n)))
        except (OSError, ValueError) as e:  # a broken pipe, an ended or garbled reply
            _kill(proc)
            raise WorkerGone(f"pid={proc.pid} {e!r}") from e
        if files != len(items):
            _kill(proc)
            raise WorkerGone(f"pid={proc.pid} hashed {files} of {len(items)} files")
        self.idle.put_nowait(proc)
        return files, size, found

    async def close(self) -> None:
        """Tell each worker there is no more (end of its input) and wait for it."""
        self.idle.put_nowait(None)
        for proc in self.all:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.all:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                _kill(proc)
                await proc.wait()
        self.all.clear()


@dataclass
class Damage:
    digest: str
    problem: str  # "mismatch" | "missing"
    kind: str  # "blob" | "manifest"
    size: int
    users: list[tuple[str, str]]  # (repo, manifest) that reference it
    ident: Ident | None = None  # the damaged file (mismatch)
    repaired: bool = False
    moved_to: str | None = None


@dataclass
class FsckReport:
    repair: bool = False
    checked: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: of which the walk over every file: hashing (the rest: second looks, the recount)
    hash_seconds: float = 0.0
    damaged: list[Damage] = field(default_factory=list)
    #: suspicious at first, fine on the second look (evicted or fetched again meanwhile)
    changed_meanwhile: int = 0
    #: (kept, counted) of running totals that differ from a recount
    drift: dict[str, tuple[int, int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        for d in self.damaged:
            if self.repair:
                where = f" -> {d.moved_to}" if d.moved_to else ""
                done = (
                    "removed from the index" + where if d.repaired else "left (changed meanwhile)"
                )
                out.append(f"{d.problem} {d.kind} {d.digest} ({d.size} bytes): {done}")
            else:
                out.append(f"{d.problem} {d.kind} {d.digest} ({d.size} bytes)")
            out += [f"  referenced by {repo}@{m}" for repo, m in d.users]
        for name, (kept, counted) in sorted(self.drift.items()):
            fixed = " (rebuilt)" if self.repair else ""
            out.append(f"totals drift {name}: kept {kept}, counted {counted}{fixed}")
        status = f"{len(self.damaged)} damaged" if self.damaged else "clean"
        if self.drift:
            status += f", {len(self.drift)} totals drifted"
        fix = [
            w
            for c, w in ((self.damaged, "remove the damage"), (self.drift, "rebuild the totals"))
            if c
        ]
        if fix and not self.repair:
            status += f" (nothing changed; run fsck --repair to {' and '.join(fix)})"
        out.append(
            f"fsck: {self.checked} files, {self.bytes} bytes hashed in {self.hash_seconds:.2f}s "
            f"({rate(self.bytes, self.hash_seconds) / 1e6:.0f} MB/s, "
            f"{rate(self.checked, self.hash_seconds):.0f} files/s), {self.seconds:.1f}s in all, "
            f"{status}"
        )
        return out


# --- on the index --------------------------------------------------------------------------------
def stored_page(index: Index, after: str, limit: int = PAGE) -> list[tuple[str, int]]:
    return [
        (d, int(n))
        for d, n in index.db.execute(
            "SELECT digest, size FROM refs WHERE digest > ? AND size IS NOT NULL "
            "ORDER BY digest LIMIT ?",
            (after, limit),
        )
    ]


def describe(index: Index, digest: str) -> tuple[int | None, str, list[tuple[str, str]]]:
    """(stored size or None, kind, users) of a digest, as the index says now."""
    row = index.db.execute("SELECT size FROM refs WHERE digest=?", (digest,)).fetchone()
    manifest = index.db.execute("SELECT 1 FROM manifests WHERE digest=?", (digest,)).fetchone()
    size = None if row is None or row[0] is None else int(row[0])
    return size, "manifest" if manifest else "blob", index.manifest_users(digest)


def forget_damaged(index: Index, damage: Damage, path: Path) -> bool:
    """Remove a damaged digest from the index if it is still stored and its file is still the
    one found damaged (or still missing). One transaction; True when removed."""
    with index.transaction() as db:
        row = db.execute("SELECT size FROM refs WHERE digest=?", (damage.digest,)).fetchone()
        if row is None or row[0] is None:
            return False  # gone meanwhile (evicted, collected)
        try:
            now: Ident | None = _ident(path.stat())
        except FileNotFoundError:
            now = None
        if now != (damage.ident if damage.problem == "mismatch" else None):
            return False  # the daemon wrote it again meanwhile
        d = damage.digest
        db.execute("DELETE FROM tags WHERE digest=?", (d,))
        db.execute("DELETE FROM repo_manifests WHERE digest=?", (d,))
        db.execute("DELETE FROM manifest_refs WHERE parent=?", (d,))
        db.execute("DELETE FROM manifests WHERE digest=?", (d,))
        db.execute("DELETE FROM repo_blobs WHERE digest=?", (d,))
        db.execute("DELETE FROM blobs WHERE digest=?", (d,))
    return True


def rebuild_totals(index: Index) -> None:
    with index.transaction() as db:
        schema.rebuild_counts(db)


def drift(index: Index) -> dict[str, tuple[int, int]]:
    """The running totals that differ from a recount, both read in one snapshot (a commit of
    the daemon between the two would look like a drift)."""
    index.db.execute("BEGIN")
    try:
        kept, counted = index.totals(), index.recount()
    finally:
        index.db.execute("COMMIT")
    return {
        name: (getattr(kept, name), getattr(counted, name))
        for name in Totals.__dataclass_fields__
        if getattr(kept, name) != getattr(counted, name)
    }


# --- the command --------------------------------------------------------------------------------------
async def fsck(
    config: Config,
    *,
    repair: bool = False,
    workers: int | None = None,
    progress: Progress | None = None,
    hasher: Callable[[Store, int], Hasher] = Hasher,
    processes: int | None = None,
) -> FsckReport:
    """Check every stored digest; with ``repair`` remove what is damaged (see the module).
    ``processes``: worker processes for the small files (None: ``workers`` of them when the
    store holds :data:`PROCESSES_FROM` files or more, none below)."""
    started = time.monotonic()
    progress = progress or Progress("fsck", enabled=False)
    root = config.storage.root
    # plain fsck only reads: it neither creates nor upgrades anything
    store, db = await open_store(root, readonly=not repair)
    work = hasher(store, workers or min(4, os.cpu_count() or 2))
    report = FsckReport(repair)
    suspicious: list[Hashed] = []
    pending: set[asyncio.Future[Tally]] = set()
    try:
        expected = await db.read(Index.totals)
        if processes is None:
            processes = work.workers if expected.stored_count >= PROCESSES_FROM else 0
        if processes:
            await work.use_processes(processes)

        async def collect(until: int) -> None:
            while len(pending) > until:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    pending.discard(fut)
                    found = fut.result()
                    report.checked += found.files
                    report.bytes += found.bytes
                    suspicious.extend(found.suspicious)
                elapsed = time.monotonic() - started
                progress.update(
                    f"{report.checked}/{expected.stored_count} files, "
                    f"{report.bytes / 1e9:.1f}/{expected.stored_bytes / 1e9:.1f} GB, "
                    f"{rate(report.bytes, elapsed) / 1e6:.0f} MB/s, {len(suspicious)} suspicious"
                )

        # the next page of the index is read while this one is hashed
        ahead = asyncio.ensure_future(db.read(stored_page, ""))
        while page := await ahead:
            ahead = asyncio.ensure_future(db.read(stored_page, page[-1][0]))
            # small files and large ones in batches of their own (see Hasher)
            small: list[tuple[str, int]] = []
            large: list[tuple[str, int]] = []
            size = 0
            for item in page:
                if item[1] < BULK_CHUNK:
                    small.append(item)
                    if len(small) < BATCH_FILES:
                        continue
                    pending.add(asyncio.ensure_future(work.run(small)))
                    small = []
                else:
                    large.append(item)
                    size += item[1]
                    if len(large) < BATCH_FILES and size < BATCH_BYTES:
                        continue
                    pending.add(asyncio.ensure_future(work.run(large)))
                    large, size = [], 0
                await collect(2 * work.workers)
            for rest in (small, large):
                if rest:
                    pending.add(asyncio.ensure_future(work.run(rest)))
                    await collect(2 * work.workers)
        await collect(0)
        report.hash_seconds = time.monotonic() - started
        for h in suspicious:
            await _confirm(db, store, work, h, report)
        report.drift = await db.read(drift)
        if repair:
            for damage in report.damaged:
                await _repair(db, store, damage)
            if report.drift:
                await db.write(rebuild_totals)
    finally:
        progress.done()
        for fut in pending:  # interrupted: the batches still out end before their workers
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await work.aclose()
        await db.close()
    report.seconds = time.monotonic() - started
    for x in report.damaged:
        log.error(
            "fsck.%s kind=%s digest=%s bytes=%d repaired=%s quarantine=%s",
            x.problem,
            x.kind,
            x.digest,
            x.size,
            x.repaired,
            x.moved_to or "-",
        )
    return report


async def _confirm(
    db: AsyncIndex, store: Store, work: Hasher, first: Hashed, report: FsckReport
) -> None:
    """A second look at a suspicious digest against the live index and the file as it is now."""
    size, kind, users = await db.read(describe, first.digest)
    if size is None:
        report.changed_meanwhile += 1  # no longer stored: evicted or collected meanwhile
        return
    again = await asyncio.get_running_loop().run_in_executor(work.pool, work.identify, first.digest)
    if again.ok:
        report.changed_meanwhile += 1  # written again meanwhile, with the right bytes
        return
    problem = "missing" if again.hexdigest is None else "mismatch"
    report.damaged.append(Damage(first.digest, problem, kind, size, users, again.ident))


async def _repair(db: AsyncIndex, store: Store, damage: Damage) -> None:
    digest = Digest.parse(damage.digest)
    path = store.blob_path(digest)
    damage.repaired = await db.write(forget_damaged, damage, path)
    if not damage.repaired or damage.problem != "mismatch":
        return

    def move() -> str | None:
        try:
            if _ident(path.stat()) != damage.ident:
                return None  # replaced after the index forgot it: the new file is not ours
            return str(store.move_aside(digest))
        except FileNotFoundError:
            return None

    damage.moved_to = await asyncio.get_running_loop().run_in_executor(None, move)
