"""``regproxy gc`` and ``regproxy fsck``: offline or beside a running daemon.

Both open the store without sweeping ``tmp/`` and the index with their own SQLite connection
(WAL: the daemon keeps serving). The daemon notices that another process changed the index at
its next eviction tick (``storage.evict_interval``) and drops its cached lookups.

**gc** removes, in the durability order (index rows, then files):

* manifests that no repository holds any more (``DELETE`` by digest leaves the bytes behind);
* blobs that no manifest of any repository references, once not accessed for
  ``storage.upload_ttl`` (a push uploads its blobs before its manifest; a repository link alone
  does not keep a blob, so a direct blob pull is reclaimed the same way);
* upload sessions not written to for ``upload_ttl``, with their temp files;
* temp files no upload session names and that nobody wrote to for ``min(upload_ttl, 1h)``
  (a crash's leftovers, when the daemon is not running to sweep them at start-up);
* files under ``blobs/`` that the index does not know (a crash between rename and index row),
  older than ``min(upload_ttl, 1h)`` so a commit in progress in a running daemon is left alone.

**fsck** re-hashes every blob and manifest file. A file whose bytes do not match its name is
removed from the index (its blob row and repository links; for a manifest also its repository
rows and tags) and then moved to ``quarantine/``; the next pull fetches it again. Index rows
whose file is missing are removed the same way. Exit status 1 when anything was found.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Final

from regproxy.config import Config
from regproxy.index import Index
from regproxy.oci import Digest
from regproxy.store import Store

log = logging.getLogger("regproxy.maintenance")
STRAY_SECONDS: Final = 3600.0


@dataclass
class GcReport:
    dry_run: bool
    manifests: list[tuple[str, int]] = field(default_factory=list)
    blobs: list[tuple[str, int]] = field(default_factory=list)
    uploads: list[str] = field(default_factory=list)
    temp_files: list[tuple[str, int]] = field(default_factory=list)
    orphans: list[tuple[str, int]] = field(default_factory=list)

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
        out.append(
            f"gc{' (dry run)' if self.dry_run else ''}: {len(self.manifests)} manifests, "
            f"{len(self.blobs)} blobs, {len(self.uploads)} uploads, "
            f"{len(self.temp_files)} temp files, {len(self.orphans)} orphan files, "
            f"{self.bytes} bytes {verb}"
        )
        return out


@dataclass
class Damage:
    digest: str
    problem: str  # "mismatch" | "missing"
    kind: str  # "blob" | "manifest"
    size: int
    users: list[tuple[str, str]]  # (repo, manifest) that reference it
    moved_to: str | None = None


@dataclass
class FsckReport:
    checked: int = 0
    bytes: int = 0
    damaged: list[Damage] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        for d in self.damaged:
            where = f" -> {d.moved_to}" if d.moved_to else ""
            out.append(f"{d.problem} {d.kind} {d.digest} ({d.size} bytes){where}")
            out += [f"  referenced by {repo}@{m}" for repo, m in d.users]
        status = f"{len(self.damaged)} damaged" if self.damaged else "clean"
        out.append(f"fsck: {self.checked} files, {self.bytes} bytes checked, {status}")
        return out


def _open(config: Config) -> tuple[Store, Index]:
    store = Store(config.storage.root)
    store.open(sweep=False)  # a running daemon's temp files are not ours to sweep
    index = Index(config.storage.root / "index.db")
    index.open()
    return store, index


def _mtime(path: os.PathLike[str] | str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return None


def gc(config: Config, *, dry_run: bool = False, now: float | None = None) -> GcReport:
    now = time.time() if now is None else now
    ttl = config.storage.upload_ttl
    stray = min(ttl, STRAY_SECONDS)
    store, index = _open(config)
    report = GcReport(dry_run)
    try:
        # index first: unreferenced manifests and blobs, expired uploads
        with index.transaction() as db:
            # what nothing references: the reference counts the index keeps (refs.live = 0)
            report.manifests = db.execute(
                "SELECT f.digest, m.size FROM refs f JOIN manifests m ON m.digest = f.digest "
                "WHERE f.live = 0 ORDER BY f.digest"
            ).fetchall()
            report.blobs = db.execute(
                "SELECT f.digest, b.size FROM refs f JOIN blobs b ON b.digest = f.digest "
                "WHERE f.live = 0 AND COALESCE(b.last_access, b.created) < ? ORDER BY f.digest",
                (now - ttl,),
            ).fetchall()
            expired = index.uploads_before(now - ttl)
            report.uploads = [u for u, _ in expired]
            if not dry_run:
                index.forget([], [d for d, _ in report.manifests], [d for d, _ in report.blobs])
                for uid in report.uploads:
                    index.remove_upload(uid)
                # a manifest's digest may also be a blob row that stays (import indexes every
                # manifest as a blob; a recent one is kept): the file is theirs in common
                doomed = [
                    d
                    for d, _ in [*report.manifests, *report.blobs]
                    if db.execute("SELECT 1 FROM refs WHERE digest=?", (d,)).fetchone() is None
                ]
        if not dry_run:
            for d in doomed:
                store.delete(Digest.parse(d))
            for uid in report.uploads:
                store.remove_temp(uid)
        # then files: temp files nobody owns, blob files the index does not know
        sessions = index.upload_ids()
        for entry in sorted(store.tmp.iterdir()):
            mtime = _mtime(entry)
            if entry.name in sessions or mtime is None or mtime >= now - stray:
                continue
            if entry.name in report.uploads:
                continue
            is_dir = entry.is_dir()
            size = 0 if is_dir else entry.stat().st_size
            report.temp_files.append((entry.name + ("/" if is_dir else ""), size))
            if dry_run:
                continue
            if is_dir:
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        for digest, size in store.iter_blobs():
            if index.is_stored(str(digest)):
                continue
            mtime = _mtime(store.blob_path(digest))
            if mtime is None or mtime >= now - stray:
                continue
            report.orphans.append((str(digest), size))
            if not dry_run:
                store.delete(digest)
    finally:
        index.close()
    log.info("gc.done %s", report.lines()[-1])
    return report


def fsck(config: Config) -> FsckReport:
    store, index = _open(config)
    report = FsckReport()
    try:
        snap = index.usage_snapshot()
        on_disk: set[str] = set()
        for digest, size in store.iter_blobs():
            d = str(digest)
            on_disk.add(d)
            report.checked += 1
            report.bytes += size
            try:
                ok = store.verify(digest)
            except FileNotFoundError:  # removed meanwhile (a running daemon evicted it)
                on_disk.discard(d)
                continue
            if not ok:
                kind = "manifest" if d in snap.manifests else "blob"
                report.damaged.append(Damage(d, "mismatch", kind, size, index.manifest_users(d)))
        for d, (size, _, _) in snap.manifests.items():
            if d not in on_disk and store.stat(Digest.parse(d)) is None:
                report.damaged.append(
                    Damage(d, "missing", "manifest", size, index.manifest_users(d))
                )
        for d, (size, _) in snap.blobs.items():
            if d not in on_disk and d not in snap.manifests and store.stat(Digest.parse(d)) is None:
                report.damaged.append(Damage(d, "missing", "blob", size, index.manifest_users(d)))
        if report.damaged:
            # index first (nothing may point to a file that is going), then the files
            with index.transaction():
                manifests = [x.digest for x in report.damaged if x.kind == "manifest"]
                index.forget([], manifests, [x.digest for x in report.damaged])
            for x in report.damaged:
                if x.problem == "mismatch":
                    try:
                        x.moved_to = str(store.move_aside(Digest.parse(x.digest)))
                    except FileNotFoundError:
                        x.moved_to = None
                log.error(
                    "fsck.%s kind=%s digest=%s bytes=%d quarantine=%s",
                    x.problem,
                    x.kind,
                    x.digest,
                    x.size,
                    x.moved_to or "-",
                )
    finally:
        index.close()
    return report
