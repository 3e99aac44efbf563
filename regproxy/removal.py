"""Removing blob files the index no longer stores, safe against writers in any process.

A writer (a push, a pull-through fetch, an import, a manifest ``PUT``, in the daemon or in
``regproxy import`` / ``prefetch`` beside it) puts its file in place, writes its index row, and
then makes sure the file is still there, putting it back from a second name it kept
(:meth:`~regproxy.store.BlobWriter.settle`) or from the bytes it has
(:meth:`~regproxy.store.Store.ensure_bytes`). A removal (eviction, ``regproxy gc``) moves the
files out of ``blobs/`` first, then asks the index which of them it stores, puts those back and
deletes the rest. Whatever the interleaving with a writer of the same digest:

* the index is asked after the writer's row is in: the removal puts the file back;
* it is asked before: the move came before the writer's check, which finds the file gone and
  puts its own back (a file the writer placed after the move is never touched).

No lock is shared: a writer never waits for a removal, nor a removal for a writer. A digest
stored again while it was being removed is missing from ``blobs/`` for the moment between the
move and the put-back.

A writer killed between its row and its check (``regproxy import`` beside the daemon) leaves
its spare in ``tmp/``; :func:`settle_spares` (the daemon's start, ``regproxy gc``) puts its file
back if the index stores the digest and none is in place, and deletes it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TypeVar

from regproxy.oci import Digest
from regproxy.store import Store, spare_digest

log = logging.getLogger("regproxy.store")
T = TypeVar("T")
U = TypeVar("U")

#: asks the index which of these digests it stores
StoredAmong = Callable[[list[str]], Awaitable[set[str]]]


async def remove(
    store: Store,
    digests: Sequence[str],
    stored_among: StoredAmong,
    *,
    pool: Executor | None = None,
    threads: int = 1,
) -> list[str]:
    """Delete the files of ``digests`` that the index does not store; returns those deleted.
    The digests are parsed on the threads (without the requests' cache of parsed digests,
    which a million evicted ones would push out), not on the event loop.
    Runs to its end once begun (a file moved out is deleted or put back): a cancelled caller
    waits for it."""
    task = asyncio.ensure_future(_remove(store, list(digests), stored_among, pool, threads))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        raise


async def _remove(
    store: Store,
    digests: list[str],
    stored_among: StoredAmong,
    pool: Executor | None,
    threads: int,
) -> list[str]:
    moved = await _spread(functools.partial(_move_out, store), digests, pool, threads)
    if not moved:
        return []
    stored = await stored_among([text for text, _, _ in moved])
    return await _spread(functools.partial(_finish, store, stored), moved, pool, threads)


async def _spread(
    job: Callable[[list[T]], list[U]], items: list[T], pool: Executor | None, threads: int
) -> list[U]:
    """``job`` over ``items``, split across up to ``threads`` threads of ``pool``."""
    loop = asyncio.get_running_loop()
    parts = [items[i::threads] for i in range(min(threads, len(items)))]
    results = await asyncio.gather(*(loop.run_in_executor(pool, job, p) for p in parts))
    return [x for part in results for x in part]


def _move_out(store: Store, digests: list[str]) -> list[tuple[str, Digest, Path]]:
    out = []
    for text in digests:
        d = Digest.parse_uncached(text)
        try:
            moved = store.move_out(d)
        except OSError as exc:
            log.warning("store.remove_failed digest=%s error=%s", d, exc)
            continue
        if moved is not None:
            out.append((text, d, moved))
    return out


def _finish(store: Store, stored: set[str], moved: list[tuple[str, Digest, Path]]) -> list[str]:
    gone = []
    for text, d, path in moved:
        try:
            if text in stored:  # stored again meanwhile: its file goes back
                store.put_back(d, path)
            else:
                gone.append(text)
            path.unlink()
        except OSError as exc:
            log.warning("store.remove_failed digest=%s path=%s error=%s", d, path, exc)
    return gone


async def settle_spares(
    store: Store, stored_among: StoredAmong, *, before: float | None = None
) -> list[tuple[str, int]]:
    """The spares writers left in ``tmp/``: the file of a digest the index stores goes back when
    none is in place, and every spare goes; returns their (name, size). ``before``: only the
    spares whose inode changed before then (a spare's link is made at its writer's commit:
    ``regproxy gc`` beside live writers), else all (the daemon's start)."""
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, _spares, store, before)
    if not found:
        return []
    stored = await stored_among([str(d) for _, d, _ in found])
    return await loop.run_in_executor(None, _settle_spares, store, found, stored)


def _spares(store: Store, before: float | None) -> list[tuple[Path, Digest, int]]:
    out = []
    for path in store.tmp.iterdir():
        d = spare_digest(path.name)
        if d is None:
            continue
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if before is None or st.st_ctime < before:
            out.append((path, d, st.st_size))
    return out


def _settle_spares(
    store: Store, found: list[tuple[Path, Digest, int]], stored: set[str]
) -> list[tuple[str, int]]:
    gone = []
    for path, d, size in found:
        try:
            if str(d) in stored:  # its writer's row is in: its file must be (a removal took it?)
                store.put_back(d, path)
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("store.remove_failed digest=%s path=%s error=%s", d, path, exc)
            continue
        gone.append((path.name, size))
    return gone
