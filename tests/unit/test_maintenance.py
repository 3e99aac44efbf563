"""Offline gc and fsck over a store a registry wrote (regproxy.maintenance)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.async_index import AsyncIndex
from regproxy.config import config_from_dict
from regproxy.progress import Progress
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store
from tests.unit.local import OCI_MANIFEST, REPO, body, digest
from tests.unit.test_fsck import _Terminal


async def test_gc_of_a_deleted_manifest_keeps_the_file_of_a_blob_with_the_same_digest(
    registry: Registry, tmp_path: Path
) -> None:
    """Bundle import indexes every manifest as a blob of its repository too. After a DELETE of
    the manifest, gc drops the manifest; the blob row (recent, so kept) must keep its file:
    never an index row without its bytes."""
    from regproxy.config import load_config
    from regproxy.fsck import fsck
    from regproxy.maintenance import gc

    cfg = b"{}"
    await registry.uploads.monolithic(REPO, digest(cfg), body(cfg), len(cfg))
    m = (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s",'
        b'"size":2},"layers":[]}' % (OCI_MANIFEST.encode(), str(digest(cfg)).encode())
    )
    md = digest(m)
    await registry.index_blob(REPO, md, len(m))  # as bundle import does for every manifest
    await registry.put_manifest(REPO, str(md), m, OCI_MANIFEST)
    await registry.delete_manifest(REPO, str(md))
    config = load_config(None, env={"REGPROXY_STORAGE_ROOT": str(registry.store.root)})
    report = await gc(config)
    assert [d for d, _ in report.manifests] == [str(md)]
    assert str(md) not in [d for d, _ in report.blobs]  # recent: the blob row stays
    assert registry.store.stat(md) == len(m), "gc removed the file of a blob it kept"
    assert not (await fsck(config)).damaged


async def deleted_manifest(registry: Registry) -> str:
    """A manifest pushed and deleted again: gc's to remove."""
    cfg = b"{}"
    await registry.uploads.monolithic(REPO, digest(cfg), body(cfg), len(cfg))
    m = (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s",'
        b'"size":2},"layers":[]}' % (OCI_MANIFEST.encode(), str(digest(cfg)).encode())
    )
    await registry.put_manifest(REPO, "v1", m, OCI_MANIFEST)
    await registry.delete_manifest(REPO, str(digest(m)))
    return str(digest(m))


async def test_gc_progress_on_a_terminal_in_every_phase_also_in_a_dry_run(
    registry: Registry,
) -> None:
    """On a terminal gc's line counts the index's unreferenced content, then the files; a
    dry run shows the same; off a terminal nothing is written."""
    from regproxy.config import load_config
    from regproxy.maintenance import gc

    gone = await deleted_manifest(registry)
    config = load_config(None, env={"REGPROXY_STORAGE_ROOT": str(registry.store.root)})
    for dry_run, tty in ((True, False), (True, True), (False, True)):
        stream = _Terminal(tty)
        report = await gc(config, dry_run=dry_run, progress=Progress("gc", stream, every=0.0))
        assert [d for d, _ in report.manifests] == [gone]
        written = stream.getvalue()
        if not tty:
            assert written == ""
            continue
        assert "gc: 1 manifests, 0 blobs" in written, (dry_run, written)
        assert f"gc: {report.files} files checked, 0 orphans" in written, (dry_run, written)
        assert written.endswith("\r")  # the line is cleared before the report


@pytest.mark.parametrize("command", ["gc", "fsck --repair"])
async def test_readyz_stays_200_while_gc_or_fsck_run_beside_the_daemon(
    tmp_path: Path, command: str
) -> None:
    """The daemon (in-process) keeps answering /readyz 200 while gc or fsck --repair work on
    its store: polled while the command waits in the middle of its run (its own thread and
    loop, as another process), while another connection holds the index's write lock (as
    their transactions do), and until the command ends. Status only: no timing."""
    from regproxy.fsck import FsckReport, fsck
    from regproxy.maintenance import GcReport, gc

    root = tmp_path / "store"
    config = config_from_dict(
        {"storage": {"root": str(root)}, "content": {"sync": {"enable": False}}}
    )
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    try:
        gone = await deleted_manifest(reg)
    finally:
        await reg.close()
    if command == "fsck --repair":  # something for it to repair (and a write to do)
        db = sqlite3.connect(root / "index.db", isolation_level=None)
        db.execute("UPDATE totals SET stored_bytes = stored_bytes + 1")
        db.close()

    reached, release = threading.Event(), threading.Event()

    class Paused(Progress):
        """The command's progress line: its first update waits for the test."""

        def update(self, text: str, *, force: bool = False) -> None:
            if not reached.is_set():
                reached.set()
                release.wait(60)

    def run_command() -> GcReport | FsckReport:
        progress = Paused(command, io.StringIO(), enabled=True)
        if command == "gc":
            return asyncio.run(gc(config, progress=progress))
        return asyncio.run(fsck(config, repair=True, processes=0, progress=progress))

    client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    statuses: list[int] = []

    async def poll(times: int) -> None:
        for _ in range(times):
            statuses.append((await client.get("/readyz")).status)

    done = asyncio.get_running_loop().run_in_executor(None, run_command)
    try:
        assert await asyncio.to_thread(reached.wait, 60), "the command never got going"
        await poll(5)  # the command in the middle of its run
        lock = sqlite3.connect(root / "index.db", isolation_level=None, timeout=30)
        try:
            lock.execute("BEGIN IMMEDIATE")  # what gc's and fsck's transactions hold
            await poll(5)
        finally:
            lock.close()
        release.set()
        for _ in range(200):  # until it ends (bounded)
            if done.done():
                break
            await poll(1)
        report = await asyncio.wait_for(done, 60)
    finally:
        release.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(done, 60)
        await client.close()
    assert statuses and set(statuses) == {200}, statuses
    if isinstance(report, GcReport):
        assert [d for d, _ in report.manifests] == [gone]
    else:
        assert report.drift and not report.damaged
