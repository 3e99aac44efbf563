"""The daemon's own sweep of blob files no index row names (regproxy.maintenance.OrphanSweeper):
what a crash between an eviction batch's commit and its files' removal leaves (found by a drill:
kill -9 mid-eviction left 5 files, 510 kB, outside max_size and fsck, until someone ran gc)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from regproxy.config import config_from_dict
from regproxy.maintenance import STRAY_SECONDS, OrphanSweeper
from regproxy.oci import Digest
from regproxy.registry import Registry
from tests.unit.test_evict import chunks, up


async def test_a_sweep_takes_old_orphans_and_nothing_else(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    stored = b"a layer a repository holds"
    await registry.uploads.monolithic(up("team/a"), Digest.of(stored), chunks(stored), len(stored))
    orphan, young = b"left by a crash mid-eviction", b"committed, its row not yet in"
    for data in (orphan, young):
        registry.store.write_bytes(Digest.of(data), data)
    # the sweep's clock an hour after the young file's last change (a file's change time cannot
    # be set back, so the young one is changed again, as a commit's rename or a put-back's link
    # does, until the kernel's clock has moved past the orphan's: a bounded loop of links)
    orphan_changed = registry.store.blob_path(Digest.of(orphan)).stat().st_ctime
    young_path = registry.store.blob_path(Digest.of(young))
    for _ in range(100_000):
        os.link(young_path, young_path.with_name("relinked"))
        os.unlink(young_path.with_name("relinked"))
        if young_path.stat().st_ctime > orphan_changed:
            break
    young_changed = young_path.stat().st_ctime
    assert young_changed > orphan_changed
    later = young_changed + STRAY_SECONDS
    with caplog.at_level("INFO", logger="regproxy.maintenance"):
        report = await OrphanSweeper(
            registry.store, registry.db, 86400.0, clock=lambda: later
        ).sweep()
    # counted, not listed (a million orphans, a lost index: the daemon's memory stays flat)
    assert (report.orphan_count, report.orphan_bytes, report.orphans) == (1, len(orphan), [])
    assert registry.store.stat(Digest.of(orphan)) is None
    assert registry.store.read(Digest.of(stored)) == stored
    assert registry.store.read(Digest.of(young)) == young
    assert "gc.orphans_swept files=3 orphans=1" in caplog.text


async def test_the_daemon_sweeps_after_the_stray_age_then_every_interval(
    registry: Registry,
) -> None:
    waits: list[float] = []
    swept = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) >= 3:
            swept.set()
            await asyncio.Event().wait()  # until stopped

    sweeper = OrphanSweeper(registry.store, registry.db, 7200.0, sleep=sleep)
    sweeper.start()
    await asyncio.wait_for(swept.wait(), 10)
    await sweeper.stop()
    assert waits[0] >= STRAY_SECONDS and waits[1:] == [7200.0, 7200.0]
    # 0: never
    off = OrphanSweeper(registry.store, registry.db, 0.0, sleep=sleep)
    off.start()
    assert off._task is None
    await off.stop()


def test_the_interval_is_a_storage_key() -> None:
    config = config_from_dict({"storage": {"root": "/tmp/x", "orphan_sweep_interval": "6h"}})
    assert config.storage.orphan_sweep_interval == 6 * 3600
    assert config_from_dict({"storage": {"root": "/tmp/x"}}).storage.orphan_sweep_interval == 86400


async def test_a_directory_the_disk_fails_is_passed_over(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from regproxy import maintenance

    a, b = b"orphan one", b"orphan two"
    for data in (a, b):
        registry.store.write_bytes(Digest.of(data), data)
    bad = registry.store.blob_path(Digest.of(a)).parent
    assert bad != registry.store.blob_path(Digest.of(b)).parent  # aa/ and d1/
    listing = maintenance._list_dir

    def failing(path: Path) -> list[str]:
        if path == bad:
            raise OSError(5, "Input/output error")
        return listing(path)

    monkeypatch.setattr(maintenance, "_list_dir", failing)
    later = time.time() + 2 * STRAY_SECONDS
    with caplog.at_level("INFO", logger="regproxy.maintenance"):
        report = await OrphanSweeper(
            registry.store, registry.db, 86400.0, clock=lambda: later
        ).sweep()
    assert report.orphan_count == 1  # the other directory's, after the failed one or before
    assert registry.store.stat(Digest.of(b)) is None and registry.store.read(Digest.of(a)) == a
    assert f"gc.orphans_dir_failed dir={bad}" in caplog.text
