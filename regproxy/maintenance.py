"""``regproxy gc``: remove what nothing needs, offline or beside a running daemon.

gc opens the store without sweeping ``tmp/`` and the index through its own
:class:`~regproxy.async_index.AsyncIndex` (WAL: the daemon keeps serving). Every change is a
short transaction of at most :data:`GC_PAGE` rows, so the daemon's writes go on between them;
the daemon notices that another process changed the index at its next eviction tick
(``storage.evict_interval``) and drops its cached lookups. It removes, in the durability order
(index rows, then files):

* manifests that no repository holds any more (``DELETE`` by digest leaves the bytes), found by
  the reference counts the index keeps (``refs.live = 0``), not by a walk over every row;
* blobs that no manifest of any repository references, once not accessed for
  ``storage.upload_ttl`` (a push uploads its blobs before its manifest; a repository link alone
  does not keep a blob, so a direct blob pull is reclaimed the same way);
* upload sessions not written to for ``upload_ttl``, with their temp files;
* temp files no upload session names and that nobody wrote to for ``min(upload_ttl, 1h)``
  (a crash's leftovers, when the daemon is not running to sweep them at start-up);
* files under ``blobs/`` that the index does not know (a crash between rename and index row),
  older than ``min(upload_ttl, 1h)`` so a commit in progress in a running daemon is left alone.
  The tree is walked one directory at a time and each directory's names are looked up in the
  index in one query: memory stays flat at a million files.

Each row is checked again inside the transaction that removes it (the daemon may have used it
meanwhile). ``--dry-run`` only reads: the index on readers only (an older schema is refused,
not upgraded; a missing store is not created), no file touched. A progress line is shown on a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from regproxy.async_index import AsyncIndex
from regproxy.config import Config
from regproxy.errors import DigestInvalid
from regproxy.index import Index
from regproxy.oci import ALGORITHMS, Digest
from regproxy.progress import Progress
from regproxy.removal import remove, settle_spares
from regproxy.store import OUT, SPARE, Store
from regproxy.store_open import open_store

log = logging.getLogger("regproxy.maintenance")
STRAY_SECONDS: Final = 3600.0
#: rows read or removed per index query / transaction
GC_PAGE: Final = 500


@dataclass
class GcReport:
    dry_run: bool
    manifests: list[tuple[str, int]] = field(default_factory=list)
    blobs: list[tuple[str, int]] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)
    temp_files: list[tuple[str, int]] = field(default_factory=list)
    orphans: list[tuple[str, int]] = field(default_factory=list)
    #: files under blobs/ looked at
    files: int = 0
    #: orphans found, and their bytes (the daemon's sweep counts them without listing them)
    orphan_count: int = 0
    orphan_bytes: int = 0

    @property
    def bytes(self) -> int:
        items = [*self.manifests, *self.blobs, *self.temp_files, *self.orphans]
        return sum(n for _, n in items)

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [f"{verb} manifest {d} ({n} bytes)" for d, n in self.manifests]
        out += [f"{verb} blob {d} ({n} bytes)" for d, n in self.blobs]
        out += [f"{verb} upload {u}" for u in self.uploads]
        out += [f"{verb} temp file {name} ({n} bytes)" for name, n in self.temp_files]
        out += [f"{verb} orphan file {d} ({n} bytes)" for d, n in self.orphans]
        out.append(self.summary())
        return out

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"gc{' (dry run)' if self.dry_run else ''}: {len(self.manifests)} manifests, "
            f"{len(self.blobs)} blobs, {len(self.uploads)} uploads, "
            f"{len(self.temp_files)} temp files, {len(self.orphans)} orphan files, "
            f"{self.bytes} bytes {verb} ({self.files} files checked)"
        )


def _mtime(path: os.PathLike[str] | str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


# --- on the index --------------------------------------------------------------------------------
_UNREFERENCED: Final = {
    "manifest": "SELECT f.digest, m.size FROM refs f JOIN manifests m ON m.digest = f.digest "
    "WHERE f.live = 0 AND f.digest > :after ORDER BY f.digest LIMIT :limit",
    "blob": "SELECT f.digest, b.size FROM refs f JOIN blobs b ON b.digest = f.digest "
    "WHERE f.live = 0 AND f.digest > :after AND COALESCE(b.last_access, b.created) < :before "
    "ORDER BY f.digest LIMIT :limit",
}


def unreferenced(
    index: Index, kind: str, after: str, before: float, limit: int = GC_PAGE
) -> list[tuple[str, int]]:
    """A page of stored manifests (or blobs last accessed before ``before``) that nothing
    references, by digest after ``after``."""
    sql = _UNREFERENCED[kind]
    args = {"after": after, "before": before, "limit": limit}
    return [(d, int(n)) for d, n in index.db.execute(sql, args)]


def drop_unreferenced(
    index: Index, kind: str, digests: Sequence[str], before: float
) -> tuple[list[tuple[str, int]], list[str]]:
    """Remove these rows if they are still unreferenced (and old); (removed, files to unlink:
    digests no longer stored at all). One transaction."""
    removed: list[tuple[str, int]] = []
    with index.transaction() as db:
        sql = _UNREFERENCED[kind].replace("f.digest > :after", "f.digest = :d")
        for d in digests:
            row = db.execute(sql, {"d": d, "before": before, "limit": 1}).fetchone()
            if row is None:
                continue  # referenced or used again meanwhile
            if kind == "manifest":
                db.execute("DELETE FROM tags WHERE digest=?", (d,))
                db.execute("DELETE FROM manifest_refs WHERE parent=?", (d,))
                db.execute("DELETE FROM manifests WHERE digest=?", (d,))
            else:
                db.execute("DELETE FROM repo_blobs WHERE digest=?", (d,))
                db.execute("DELETE FROM blobs WHERE digest=?", (d,))
            removed.append((d, int(row[1])))
        # a manifest's digest may also be a blob row that stays (import indexes every manifest
        # as a blob; a recent one is kept): the file is theirs in common
        gone = [d for d, _ in removed if not index.is_stored(d)]
    return removed, gone


def known(index: Index, digests: Sequence[str]) -> set[str]:
    """Which of these digests the index stores (one query for a directory's names)."""
    out: set[str] = set()
    for i in range(0, len(digests), GC_PAGE):
        chunk = digests[i : i + GC_PAGE]
        marks = ",".join("?" * len(chunk))
        out.update(
            d
            for (d,) in index.db.execute(
                f"SELECT digest FROM refs WHERE digest IN ({marks}) AND size IS NOT NULL", chunk
            )
        )
    return out


def expire_uploads(index: Index, uids: Sequence[str]) -> None:
    with index.transaction():
        for uid in uids:
            index.remove_upload(uid)


# --- on the files ------------------------------------------------------------------------------------
def _list_dir(path: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(path) if e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _in_use(name: str) -> bool:
    return name.endswith(SPARE) or OUT in name


def _sweep_temp(
    store: Store, sessions: set[str], cutoff: float, dry_run: bool
) -> list[tuple[str, int]]:
    """Temp files no upload session names and nobody wrote to since ``cutoff``."""
    out: list[tuple[str, int]] = []
    try:
        entries = sorted(store.tmp.iterdir())
    except FileNotFoundError:  # a dry run on a store without tmp/ (made at the daemon's start)
        return out
    for entry in entries:
        mtime = _mtime(entry)
        # a running process's spare names and files moved out by a removal are not gc's
        if entry.name in sessions or mtime is None or mtime >= cutoff or _in_use(entry.name):
            continue
        is_dir = entry.is_dir()
        size = 0 if is_dir else entry.stat().st_size
        out.append((entry.name + ("/" if is_dir else ""), size))
        if dry_run:
            continue
        if is_dir:
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    return out


def _orphans(
    store: Store, alg: str, names: list[str], stored: set[str], cutoff: float, by_change: bool
) -> list[tuple[str, int]]:
    """Files of one directory the index does not know, not written since ``cutoff`` (with
    ``by_change``, not changed: a commit's rename, or a put-back's link, makes an old upload's
    file new)."""
    out = []
    for name in names:
        d = f"{alg}:{name}"
        if d in stored:
            continue
        try:  # not through the requests' cache of parsed digests, which a sweep would flush
            digest = Digest.parse_uncached(d)
        except DigestInvalid:
            continue  # not a name the store writes: not ours to remove
        path = store.blob_path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if (st.st_ctime if by_change else st.st_mtime) >= cutoff:
            continue
        out.append((d, st.st_size))
    return out


async def sweep_orphans(
    store: Store,
    db: AsyncIndex,
    report: GcReport,
    *,
    stray: float,
    dry_run: bool,
    progress: Progress | None = None,
    listed: bool = True,
    by_change: bool = False,
) -> None:
    """Blob files the index does not know, untouched since ``stray``: one directory at a
    time, its names looked up in one query; removed (unless ``dry_run``) through
    :mod:`regproxy.removal`, which asks the index again once they moved out. ``listed``: each
    one in ``report.orphans`` too (gc prints them), else only counted. ``by_change``: aged by
    the inode's change time, not its last write (the daemon's sweep, always beside writers; gc
    ages by the last write, which an operator can set back). A directory the disk fails (EIO,
    EACCES) is logged and passed over."""
    loop = asyncio.get_running_loop()
    for alg in ALGORITHMS:
        base = store.blobs / alg
        for sub in await loop.run_in_executor(None, _subdirs, base):
            try:
                names = await loop.run_in_executor(None, _list_dir, base / sub)
                stored = await db.read(known, [f"{alg}:{n}" for n in names])
                found = await loop.run_in_executor(
                    None, _orphans, store, alg, names, stored, stray, by_change
                )
                if found and not dry_run:
                    await remove(store, [d for d, _ in found], lambda ds: db.read(known, ds))
            except OSError as exc:
                log.warning("gc.orphans_dir_failed dir=%s error=%s", base / sub, exc)
                continue
            report.files += len(names)
            report.orphan_count += len(found)
            report.orphan_bytes += sum(n for _, n in found)
            if listed:
                report.orphans += found
            if progress is not None:
                progress.update(f"{report.files} files checked, {report.orphan_count} orphans")


class OrphanSweeper:
    """The daemon's own sweep of orphan blob files, every ``storage.orphan_sweep_interval``
    (the first a while after start: an orphan must be older than :data:`STRAY_SECONDS`).

    A crash (power loss, ``kill -9``) between an eviction batch's commit and the removal of its
    files leaves files no index row names: outside the store's size (``max_size`` does not see
    them) and outside ``fsck``'s view; only ``regproxy gc`` took them back, and on a host nobody
    reaches nobody runs it. The sweep is gc's walk of ``blobs/`` (:func:`sweep_orphans`): each
    directory listed on a thread, looked up on an index reader, the event loop's turn between
    directories."""

    def __init__(
        self,
        store: Store,
        db: AsyncIndex,
        interval: float,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.store, self.db, self.interval = store, db, interval
        self.clock, self._sleep = clock, sleep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="orphan-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep(self) -> GcReport:
        """One pass: orphans last written more than :data:`STRAY_SECONDS` ago go."""
        report = GcReport(dry_run=False)
        started = time.monotonic()
        stray = self.clock() - STRAY_SECONDS
        await sweep_orphans(
            self.store, self.db, report, stray=stray, dry_run=False, listed=False, by_change=True
        )
        (log.warning if report.orphan_count else log.info)(
            "gc.orphans_swept files=%d orphans=%d bytes=%d seconds=%.1f",
            report.files,
            report.orphan_count,
            report.orphan_bytes,
            time.monotonic() - started,
        )
        return report

    async def _run(self) -> None:
        await self._sleep(STRAY_SECONDS + min(self.interval, 600.0))
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("gc.orphans_sweep_failed root=%s", self.store.root)
            await self._sleep(self.interval)


# --- the command ----------------------------------------------------------------------------------------
async def gc(
    config: Config,
    *,
    dry_run: bool = False,
    now: float | None = None,
    progress: Progress | None = None,
) -> GcReport:
    now = time.time() if now is None else now
    ttl = config.storage.upload_ttl
    stray = now - min(ttl, STRAY_SECONDS)
    progress = progress or Progress("gc", enabled=False)
    root = config.storage.root
    loop = asyncio.get_running_loop()
    store, db = await open_store(root, readonly=dry_run)  # a dry run creates nothing
    report = GcReport(dry_run)
    try:
        # index first: what nothing references, page by page, each page its own transaction
        for kind, found in (("manifest", report.manifests), ("blob", report.blobs)):
            after = ""
            while True:
                page = await db.read(unreferenced, kind, after, now - ttl)
                if not page:
                    break
                after = page[-1][0]
                if dry_run:
                    found.extend(page)
                else:
                    removed, gone = await db.write(
                        drop_unreferenced, kind, [d for d, _ in page], now - ttl
                    )
                    found.extend(removed)
                    # stored again meanwhile (asked after the files moved out): not ours
                    await remove(store, gone, lambda ds: db.read(known, ds))
                progress.update(f"{len(report.manifests)} manifests, {len(report.blobs)} blobs")
        expired = await db.read(Index.uploads_before, now - ttl)
        report.uploads = [u for u, _ in expired]
        if not dry_run and report.uploads:
            await db.write(expire_uploads, report.uploads)
            for uid in report.uploads:
                await loop.run_in_executor(None, store.remove_temp, uid)
        # then files: temp files nobody owns, blob files the index does not know
        sessions = await db.read(Index.upload_ids) | set(report.uploads)
        report.temp_files = await loop.run_in_executor(
            None, _sweep_temp, store, sessions, stray, dry_run
        )
        if not dry_run:  # spares writers killed before their settle left (regproxy.removal)
            report.temp_files += await settle_spares(
                store, lambda ds: db.read(known, ds), before=stray
            )
        await sweep_orphans(store, db, report, stray=stray, dry_run=dry_run, progress=progress)
    finally:
        progress.done()
        await db.close()
    log.info("gc.done %s", report.summary())
    return report


def _subdirs(base: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []
