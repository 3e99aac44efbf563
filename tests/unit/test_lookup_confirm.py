"""Confirming cached tags: not behind a long write of the daemon's own, never across another
process's change (regproxy.lookup_confirm)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.index import Index, ManifestRow
from regproxy.lookup_confirm import IndexWatch
from regproxy.lookups import TAG_CONFIRM_SECONDS, LookupCache

ROW = ManifestRow("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json", 10)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[AsyncIndex]:
    index = AsyncIndex(tmp_path / "index.db")
    await index.open()
    yield index
    await index.close()


async def held_writer(db: AsyncIndex) -> tuple[asyncio.Future[None], threading.Event]:
    """The writer inside a write transaction until the returned event is set (an eviction
    batch that takes long): its future, and the event."""
    entered, release = threading.Event(), threading.Event()

    def hold(ix: Index) -> None:
        with ix.transaction():
            entered.set()
            release.wait(30)

    held = asyncio.ensure_future(db.write(hold))
    assert await asyncio.to_thread(entered.wait, 30)
    return held, release


async def vouched_for_by_confirmations_only(cache: LookupCache) -> None:
    """A tag read long ago, since the confirmations (re)started, and none since: believed
    again only when a confirmation comes."""
    long_ago = time.monotonic() - 10
    cache.restart_tags(long_ago)
    cache.put_tag("r", "v1", ROW, long_ago, cache.ticket())
    assert cache.tag("r", "v1", time.monotonic()) is None


async def test_tags_are_confirmed_while_the_writer_holds_a_long_transaction(
    db: AsyncIndex,
) -> None:
    cache = LookupCache()
    watch = IndexWatch(db, cache)
    await watch.check()  # the first check starts the confirmations
    await vouched_for_by_confirmations_only(cache)
    held, release = await held_writer(db)
    try:
        await asyncio.wait_for(watch.check(), 30)  # answered without the writer
        assert not held.done()
        assert cache.tag("r", "v1", time.monotonic()) == ROW
    finally:
        release.set()
        await held


async def test_a_change_by_another_process_is_never_confirmed_behind_a_long_write(
    db: AsyncIndex, tmp_path: Path
) -> None:
    cache = LookupCache()
    watch = IndexWatch(db, cache)
    await watch.check()
    await vouched_for_by_confirmations_only(cache)
    cache.put_manifest("r", ROW.digest, ROW, cache.ticket())
    other = Index(tmp_path / "index.db")  # another process (import, gc) commits a change
    other.open()
    with other.transaction():
        other.ensure_repo("elsewhere", None, "elsewhere")
    other.close()
    held, release = await held_writer(db)
    checking = asyncio.ensure_future(watch.check())
    try:
        # the writer's transaction began after the change: no peek may vouch for the tags
        done, _ = await asyncio.wait({checking}, timeout=TAG_CONFIRM_SECONDS * 2.5)
        assert not done
        assert cache.tag("r", "v1", time.monotonic()) is None
    finally:
        release.set()
        await held
    await checking  # the check's own read sees the change: everything cached goes
    assert cache.manifest("r", ROW.digest) is None
    assert cache.tag("r", "v1", time.monotonic()) is None


async def test_tags_are_confirmed_while_a_background_write_waits_for_the_cpu(
    db: AsyncIndex,
) -> None:
    """An eviction batch handed to the background thread, which the kernel has not run up to
    its transaction yet (it runs at a lower priority): the writer's queue waits, the
    connection is free."""
    cache = LookupCache()
    watch = IndexWatch(db, cache)
    await watch.check()
    await vouched_for_by_confirmations_only(cache)
    started, release = threading.Event(), threading.Event()

    def batch(ix: Index) -> None:
        started.set()
        release.wait(30)  # not run yet
        with ix.transaction():
            ix.ensure_repo("evicting", None, "evicting")

    queued = asyncio.ensure_future(db.write_background(batch))
    assert await asyncio.to_thread(started.wait, 30)
    try:
        await asyncio.wait_for(watch.check(), 30)
        assert not queued.done()
        assert cache.tag("r", "v1", time.monotonic()) == ROW
    finally:
        release.set()
        await queued
    await watch.check()  # the daemon's own commit is no other process's change
    assert cache.tag("r", "v1", time.monotonic()) == ROW
