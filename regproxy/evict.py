"""Eviction: keep the store under ``storage.max_size`` and the filesystem above ``min_free``.

When it runs: every ``storage.evict_interval``, and soon after each committed fetch (the
fetcher's ``on_commit`` pokes the loop; a check is one SQL sum and one ``statvfs``, no scan).
The store's size is the sum of the sizes the index records; the limit is
``max_size.resolve(filesystem bytes)``; the floor is ``min_free.resolve(filesystem bytes)``
against ``statvfs`` free space. Only when one of them is crossed is anything planned.

What is evicted (the policy, decided here):

* **The unit** is a repository's manifest (a ``repo_manifests`` row) together with the rows of
  the same repository that only it brings in: the children of an index and the referrers whose
  subject it is. The unit's last access is the latest of its rows. Least recently used first.
* **Pinned content is never evicted**: a pinned row (pushed, imported, prefetched or ``regproxy
  pin``), and every manifest and blob reachable from a pinned row in any repository (an index's
  children inherit its pin). A unit whose top manifest is pinned is skipped; pinned rows inside
  an unpinned unit stay.
* **Blobs go with the last manifest that references them.** References are counted through
  ``manifest_refs`` from every kept row; a manifest file or blob is deleted only when no kept
  manifest reaches it any more. Repository links (``repo_blobs``) do not keep a blob: they are
  dropped with it, so the next pull fetches it again. Blobs that no manifest references at all
  (a direct blob pull, or a push whose manifest has not come yet) are units of their own, by
  their last access, and only once they are older than ``storage.upload_ttl``.
* **In use**: nothing is evicted that was accessed in the last :data:`IN_USE_SECONDS` (access
  times are flushed to the index before each plan), and no unit that would delete a digest the
  fetcher is transferring. This is the "accessed recently" guard, not a refcount: a response that
  already opened its file finishes even if the file is unlinked (the descriptor holds it), so
  only the short lookup-to-open window needs covering.

How: plan and drop the index rows in one write transaction (nothing may point to a missing file),
then drop the registry's cached lookups, then delete the files. Metrics ``STORE_BYTES``,
``PINNED_BYTES`` and ``EVICTED_BYTES`` are updated; one log line per evicted manifest.

The same loop notices when another process (``regproxy gc``, ``fsck``, ``import``) changed the
index (SQLite's ``data_version``) and drops the registry's cached lookups, so content those tools
removed is fetched again rather than looked for on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from regproxy import metrics
from regproxy.config import Config
from regproxy.fetch import Fetcher
from regproxy.index import Index, UsageSnapshot
from regproxy.oci import Digest
from regproxy.registry import Registry

log = logging.getLogger("regproxy.evict")
#: a manifest or blob accessed this recently counts as being served: never evicted
IN_USE_SECONDS: Final = 5.0
STUCK_LOG_SECONDS: Final = 60.0
_TASKS: set[asyncio.Task[Any]] = set()


@dataclass
class Evicted:
    repo: str  # "" for a blob or manifest no repository manifest referenced
    digest: str
    bytes: int


@dataclass
class Plan:
    rows: list[tuple[str, str]] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    evicted: list[Evicted] = field(default_factory=list)
    freed: int = 0
    pinned_bytes: int = 0
    #: bytes still over the limit (or under the floor) when nothing more may go
    short: int = 0


def pinned_closure(snap: UsageSnapshot) -> set[str]:
    """Every digest reachable from a pinned repository manifest."""
    return _reachable(snap, [d for _, d, _, pinned in snap.rows if pinned])


def _children(snap: UsageSnapshot) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for parent, child, _kind in snap.refs:
        out[parent].append(child)
    return out


def _size(snap: UsageSnapshot, digest: str) -> int:
    if digest in snap.manifests:
        return snap.manifests[digest][0]
    if digest in snap.blobs:
        return snap.blobs[digest][0]
    return 0


def live_set(snap: UsageSnapshot) -> set[str]:
    """Every digest reachable from some repository manifest row."""
    return _reachable(snap, [d for _, d, _, _ in snap.rows])


def _reachable(snap: UsageSnapshot, roots: list[str]) -> set[str]:
    """``roots`` and every digest they reference, directly or through child manifests."""
    children = _children(snap)
    todo = list(roots)
    seen: set[str] = set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        todo.extend(children.get(d, ()))
    return seen


class _Refs:
    """Reference counts: one per kept row naming a digest, one per live manifest listing it."""

    def __init__(self, snap: UsageSnapshot) -> None:
        self.children = _children(snap)
        self.count: dict[str, int] = defaultdict(int)
        for _, d, _, _ in snap.rows:
            self.count[d] += 1
        for m in live_set(snap):
            for c in self.children.get(m, ()):
                self.count[c] += 1

    def release(self, digest: str, log_: list[str], dead: list[str]) -> None:
        """Drop one reference; cascade into the children of what dies. ``log_`` allows undo."""
        stack = [digest]
        while stack:
            d = stack.pop()
            self.count[d] -= 1
            log_.append(d)
            if self.count[d] == 0:
                dead.append(d)
                stack.extend(self.children.get(d, ()))

    def undo(self, log_: list[str]) -> None:
        for d in log_:
            self.count[d] += 1


def plan(
    snap: UsageSnapshot,
    need: int,
    *,
    now: float,
    in_use: float = IN_USE_SECONDS,
    loose_age: float = 86400.0,
    busy: Iterable[str] = (),
) -> Plan:
    """Choose what to evict to free ``need`` bytes (pure: the caller applies it)."""
    busy = set(busy)
    pinned = pinned_closure(snap)
    result = Plan(pinned_bytes=sum(_size(snap, d) for d in pinned))
    if need <= 0:
        return result
    refs = _Refs(snap)
    recent = now - in_use

    def last_access(d: str) -> float:
        if d in snap.blobs:
            return snap.blobs[d][1]
        return snap.manifests[d][2] if d in snap.manifests else 0.0

    # units: groups of rows per repository, rooted at rows nothing else in the repository lists
    by_repo: dict[str, dict[str, tuple[float, bool]]] = defaultdict(dict)
    for repo, d, last, is_pinned in snap.rows:
        by_repo[repo][d] = (last, is_pinned)
    units: list[tuple[float, str, str, list[str]]] = []  # (last access, repo, root, rows)
    row_units: dict[tuple[str, str], int] = defaultdict(int)
    for repo, rows in by_repo.items():
        below: dict[str, list[str]] = defaultdict(list)
        for d in rows:
            for c in refs.children.get(d, ()):
                if c in rows and c != d:
                    below[d].append(c)
            subject = snap.manifests.get(d, (0, None, 0.0))[1]
            if subject is not None and subject in rows and subject != d:
                below[subject].append(d)  # a referrer goes with its subject
        listed = {c for cs in below.values() for c in cs}
        for root in rows:
            if root in listed:
                continue
            members, todo = [], [root]
            while todo:
                d = todo.pop()
                if d in members:
                    continue
                members.append(d)
                todo.extend(below.get(d, ()))
            for d in members:
                row_units[(repo, d)] += 1
            units.append((max(rows[d][0] for d in members), repo, root, members))
    # loose content: what no repository manifest reaches, once old enough
    for d, (_, last) in snap.blobs.items():
        if refs.count.get(d, 0) == 0 and last < now - loose_age:
            units.append((last, "", d, []))
    for d, (_, _, created) in snap.manifests.items():
        if refs.count.get(d, 0) == 0 and d not in snap.blobs and created < now - loose_age:
            units.append((created, "", d, []))
    units.sort(key=lambda u: (u[0], u[1], u[2]))

    gone: set[str] = set()
    for last, repo, root, members in units:
        if result.freed >= need:
            break
        if last >= recent or root in busy or root in gone:
            continue
        if repo and (by_repo[repo][root][1] or root in pinned):
            continue
        if not repo:  # loose blob or manifest: no references to release
            size = _size(snap, root)
            (result.manifests if root in snap.manifests else result.blobs).append(root)
            if root in snap.manifests and root in snap.blobs:
                result.blobs.append(root)
            gone.add(root)
            result.freed += size
            result.evicted.append(Evicted("", root, size))
            continue
        drop: list[str] = []
        for d in members:
            row_units[(repo, d)] -= 1
            pinned_d = by_repo[repo][d][1]
            if row_units[(repo, d)] == 0 and not pinned_d and d not in pinned:
                drop.append(d)
        undo: list[str] = []
        dead: list[str] = []
        for d in drop:
            refs.release(d, undo, dead)
        if any(d in busy or last_access(d) >= recent for d in dead):
            refs.undo(undo)
            for d in members:
                row_units[(repo, d)] += 1
            continue
        freed = 0
        for d in dead:
            if d in gone:
                continue
            gone.add(d)
            if d in snap.manifests:
                result.manifests.append(d)
            if d in snap.blobs:
                result.blobs.append(d)
            freed += _size(snap, d)
        result.rows.extend((repo, d) for d in drop)
        result.freed += freed
        result.evicted.append(Evicted(repo, root, freed))
    result.short = max(0, need - result.freed)
    return result


def evict_in_index(
    index: Index, need: int, *, in_use: float, loose_age: float, busy: set[str]
) -> Plan:
    """Plan and drop the index rows in one write transaction (run on the index thread)."""
    with index.transaction():
        p = plan(
            index.usage_snapshot(),
            need,
            now=time.time(),
            in_use=in_use,
            loose_age=loose_age,
            busy=busy,
        )
        if p.rows or p.manifests or p.blobs:
            index.forget(p.rows, p.manifests, p.blobs)
    return p


class Evictor:
    """The daemon's eviction loop (started and stopped by app.py's cleanup_ctx)."""

    def __init__(
        self, registry: Registry, config: Config, *, in_use: float = IN_USE_SECONDS
    ) -> None:
        self.registry = registry
        self.config = config
        self.in_use = in_use
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._data_version: int | None = None
        self._stuck_logged = -STUCK_LOG_SECONDS
        fetcher = getattr(registry, "fetcher", None)
        self.fetcher = fetcher if isinstance(fetcher, Fetcher) else None

    def start(self) -> None:
        if self.fetcher is not None:
            committed = self.fetcher.on_commit

            async def on_commit(digest: Digest, size: int, repo: str, source: str) -> None:
                await committed(digest, size, repo, source)
                self.poke()

            self.fetcher.on_commit = on_commit
        self._task = asyncio.create_task(self._run(), name="evict")
        _TASKS.add(self._task)
        self._task.add_done_callback(_TASKS.discard)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Ask for a check soon (a fetch committed new bytes)."""
        self._wake.set()

    async def _run(self) -> None:
        interval = max(self.config.storage.evict_interval, 0.1)
        full = True  # the first check, and every interval tick, also recounts pinned bytes
        while True:
            try:
                await self.check(full=full)
            except Exception:
                log.exception("evict.failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
                full = False
            except TimeoutError:
                full = True
            self._wake.clear()

    def _busy(self) -> set[str]:
        return {str(d) for d in self.fetcher.inflight} if self.fetcher is not None else set()

    async def check(self, *, full: bool = True) -> Plan | None:
        """One round: measure, and evict when over the limit or under the floor."""
        reg = self.registry
        version = await reg.db.write(Index.data_version)
        if self._data_version is not None and version != self._data_version:
            log.info("index.changed_elsewhere dropping cached lookups")
            reg.drop_cached()
        self._data_version = version
        store_bytes = await reg.db.read(Index.store_bytes)
        metrics.STORE_BYTES.set(store_bytes)
        loop = asyncio.get_running_loop()
        total, free = await loop.run_in_executor(None, reg.store.disk_usage)
        storage = self.config.storage
        limit = storage.max_size.resolve(total) if storage.max_size else None
        floor = storage.min_free.resolve(total) if storage.min_free else 0
        need = max(0, store_bytes - limit if limit is not None else 0, floor - free)
        metrics.STORE_LIMIT_BYTES.set(limit or 0)
        metrics.STORE_FS_FREE_BYTES.set(free)
        if full or need:
            metrics.PINNED_BYTES.set(await reg.db.read(Index.pinned_bytes))
        if need <= 0:
            metrics.EVICT_SHORT_BYTES.set(0)
            return None
        p = await self.evict(need)
        metrics.STORE_BYTES.set(max(0, store_bytes - p.freed))
        metrics.PINNED_BYTES.set(p.pinned_bytes)
        metrics.EVICT_SHORT_BYTES.set(p.short)
        now = time.monotonic()
        if p.freed == 0 and now - self._stuck_logged < STUCK_LOG_SECONDS:
            return p  # nothing may go yet (pinned, in use, recent): say so once a minute
        self._stuck_logged = now if p.freed == 0 else 0.0
        (log.warning if p.short else log.info)(
            "evict.done freed=%d store=%d limit=%s free=%d floor=%d short=%d",
            p.freed,
            store_bytes - p.freed,
            limit if limit is not None else "-",
            free,
            floor,
            p.short,
        )
        return p

    async def evict(self, need: int) -> Plan:
        """Evict until ``need`` bytes are freed or nothing more may go."""
        reg = self.registry
        await reg.flush_access()
        p = await reg.db.write(
            evict_in_index,
            need,
            in_use=self.in_use,
            loose_age=self.config.storage.upload_ttl,
            busy=self._busy(),
        )
        reg.drop_cached(p.rows, [*p.manifests, *p.blobs])
        inflight = self._busy()  # a fetch that started meanwhile replaces the file itself
        doomed = [Digest.parse(d) for d in dict.fromkeys([*p.manifests, *p.blobs])]
        await asyncio.get_running_loop().run_in_executor(
            None, _delete_files, reg, [d for d in doomed if str(d) not in inflight]
        )
        for e in p.evicted:
            log.info("evict.manifest repo=%s digest=%s bytes=%d", e.repo or "-", e.digest, e.bytes)
        metrics.EVICTED_BYTES.inc(p.freed)
        return p


def _delete_files(registry: Registry, digests: list[Digest]) -> None:
    for d in digests:
        try:
            registry.store.delete(d)
        except OSError as exc:
            log.warning("evict.unlink_failed digest=%s error=%s", d, exc)
