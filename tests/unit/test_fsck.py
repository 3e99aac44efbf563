"""fsck beside a working daemon (in-process): damage is reported, plain fsck changes nothing,
--repair removes only what is still damaged, and nothing the daemon changed meanwhile is
called damaged or removed."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy import hash_files
from regproxy.async_index import AsyncIndex
from regproxy.config import Config, config_from_dict
from regproxy.fsck import Hashed, Hasher, Tally, fsck
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.progress import Progress
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store

REPO = RepoName("spectro-images/docker.io/team/app", "docker.io", "team/app")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYERS = [os.urandom(3000), os.urandom(9_000_000)]  # a small one and one read ahead


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[Registry, Config]]:
    """The daemon's registry with one image pulled through and a loose blob."""
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    config_blob = b'{"os": "linux"}'
    for b in (config_blob, *LAYERS, b"loose"):
        await reg.uploads.monolithic(REPO, Digest.of(b), chunks(b), len(b))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "a/b", "digest": str(Digest.of(config_blob)), "size": 15},
            "layers": [
                {"mediaType": "a/c", "digest": str(Digest.of(b)), "size": len(b)} for b in LAYERS
            ],
        }
    ).encode()
    await reg.put_manifest(REPO, "v1", manifest, OCI_MANIFEST, pinned=False)
    yield reg, config_from_dict({"storage": {"root": str(root)}})
    await reg.close()


def snapshot(root: Path) -> tuple[dict[str, bytes], dict[str, list[Any]]]:
    files = {p.name: p.read_bytes() for p in (root / "blobs").rglob("*") if p.is_file()}
    db = sqlite3.connect(root / "index.db")
    try:
        tables = ("blobs", "repo_blobs", "manifests", "repo_manifests", "tags", "refs", "totals")
        rows = {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        db.close()
    return files, rows


def damage(store: Store, data: bytes) -> Path:
    path = store.blob_path(Digest.of(data))
    bad = bytearray(path.read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    return path


def rewrite(store: Store, data: bytes) -> None:
    """The daemon fetched it again: a new file with the right bytes, renamed into place."""
    tmp = store.temp_path()
    tmp.write_bytes(data)
    os.replace(tmp, store.blob_path(Digest.of(data)))


class Meddling(Hasher):
    """Hashes as fsck does; around the hashes of one digest, the daemon does something."""

    def __init__(
        self,
        store: Store,
        workers: int,
        target: str,
        before_first: Callable[[], None] | None = None,
        after: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(store, workers)
        self.target, self.before_first, self.after, self.seen = target, before_first, after, 0

    def hash_batch(self, items: list[tuple[str, int]]) -> Tally:
        out = Tally()
        for item in items:
            if item[0] == self.target and self.before_first is not None:
                self.before_first()
                self.before_first = None
            out.add(super().hash_batch([item]))
            if item[0] == self.target:
                self._seen()
        return out

    def identify(self, digest: str) -> Hashed:
        hashed = super().identify(digest)
        if digest == self.target:
            self._seen()
        return hashed

    def _seen(self) -> None:
        self.seen += 1
        if self.after is not None:
            self.after(self.seen)


async def test_damage_is_reported_without_a_change_and_repair_removes_it(running) -> None:
    reg, config = running
    root = config.storage.root
    clean = await fsck(config)
    totals = await reg.db.read(Index.totals)
    assert not clean.damaged and not clean.drift and clean.checked == totals.stored_count
    assert clean.bytes == totals.stored_bytes

    path = damage(reg.store, LAYERS[1])
    before = snapshot(root)
    found = await fsck(config)
    assert [(d.problem, d.kind, d.digest) for d in found.damaged] == [
        ("mismatch", "blob", str(Digest.of(LAYERS[1])))
    ]
    assert found.damaged[0].users and found.damaged[0].users[0][0] == REPO.canonical
    assert snapshot(root) == before  # plain fsck changes nothing

    repaired = await fsck(config, repair=True)
    assert [d.repaired for d in repaired.damaged] == [True]
    moved = repaired.damaged[0].moved_to
    assert moved is not None and Path(moved).read_bytes() == before[0][path.name]
    assert not path.exists()
    assert await reg.db.read(Index.blob_in_repo, REPO.canonical, str(Digest.of(LAYERS[1]))) is None
    assert await reg.db.read(Index.totals) == await reg.db.read(Index.recount)
    assert not (await fsck(config)).damaged


@pytest.mark.process
async def test_small_files_in_worker_processes_find_what_the_thread_finds(running) -> None:
    """The worker processes (a large store's small files) report the same damage as the
    thread: a file changed, a file gone, a file grown; the large one still on threads."""
    reg, config = running
    small = [b'{"os": "linux"}', LAYERS[0], b"loose"]
    damage(reg.store, LAYERS[0])
    reg.store.blob_path(Digest.of(b"loose")).unlink()
    grown = reg.store.blob_path(Digest.of(small[0]))
    grown.write_bytes(small[0] + b" ")
    on_thread = await fsck(config, processes=0)
    in_processes = await fsck(config, processes=2)
    found = sorted((d.problem, d.digest) for d in in_processes.damaged)
    assert found == sorted((d.problem, d.digest) for d in on_thread.damaged)
    assert found == sorted(
        [
            ("mismatch", str(Digest.of(LAYERS[0]))),
            ("mismatch", str(Digest.of(small[0]))),
            ("missing", str(Digest.of(b"loose"))),
        ]
    )
    assert (in_processes.checked, in_processes.bytes) == (on_thread.checked, on_thread.bytes)


@pytest.mark.process
async def test_a_worker_process_killed_leaves_its_batch_to_the_thread(running) -> None:
    reg, _ = running
    hasher = Hasher(reg.store, 2)
    try:
        await hasher.use_processes(2)
        assert hasher.processes is not None
        for proc in hasher.processes.all:
            proc.kill()
            await proc.wait()
        items = [(str(Digest.of(b)), len(b)) for b in (b'{"os": "linux"}', LAYERS[0])]
        damage(reg.store, LAYERS[0])
        # more batches at once than workers: some wait for a worker that never comes back
        tallies = await asyncio.gather(*(hasher.run(items) for _ in range(5)))
        assert hasher.processes is None  # given up: the rest goes to the thread
        for tally in tallies:
            assert (tally.files, tally.bytes) == (2, 15 + len(LAYERS[0]))
            assert [h.digest for h in tally.suspicious] == [str(Digest.of(LAYERS[0]))]
    finally:
        await hasher.aclose()


async def test_content_evicted_while_fsck_runs_is_not_damage(running) -> None:
    reg, config = running
    root = config.storage.root
    loose = str(Digest.of(b"loose"))

    def evict() -> None:  # another writer: the index rows first, then the file
        ix = Index(root / "index.db")
        try:
            with ix.transaction() as db:
                db.execute("DELETE FROM repo_blobs WHERE digest=?", (loose,))
                db.execute("DELETE FROM blobs WHERE digest=?", (loose,))
        finally:
            ix.close()
        reg.store.delete(Digest.parse(loose))

    report = await fsck(
        config, repair=True, hasher=lambda s, n: Meddling(s, n, loose, before_first=evict)
    )
    assert not report.damaged and report.changed_meanwhile == 1
    assert await reg.db.read(Index.totals) == await reg.db.read(Index.recount)


async def test_damage_fetched_again_while_fsck_runs_is_left_alone(running) -> None:
    reg, config = running
    layer = LAYERS[0]
    target = str(Digest.of(layer))
    damage(reg.store, layer)

    # fixed between the walk's hash and the second look: not damage at all
    report = await fsck(
        config,
        repair=True,
        hasher=lambda s, n: Meddling(
            s, n, target, after=lambda seen: rewrite(reg.store, layer) if seen == 1 else None
        ),
    )
    assert not report.damaged and report.changed_meanwhile == 1
    assert reg.store.read(Digest.parse(target)) == layer

    # fixed after the second look, before the repair: reported, but nothing is removed
    damage(reg.store, layer)
    before = snapshot(config.storage.root)
    report = await fsck(
        config,
        repair=True,
        hasher=lambda s, n: Meddling(
            s, n, target, after=lambda seen: rewrite(reg.store, layer) if seen == 2 else None
        ),
    )
    assert [(d.digest, d.repaired, d.moved_to) for d in report.damaged] == [(target, False, None)]
    assert "left (changed meanwhile)" in "\n".join(report.lines())
    after = snapshot(config.storage.root)
    assert after[1] == before[1]  # the index is untouched
    assert reg.store.read(Digest.parse(target)) == layer
    assert await reg.db.read(Index.blob_in_repo, REPO.canonical, target) == len(layer)


class _Terminal(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


async def test_progress_only_on_a_terminal(running) -> None:
    _, config = running
    for tty in (False, True):
        stream = _Terminal(tty)
        found = await fsck(config, progress=Progress("fsck", stream, every=0.0))
        assert found.checked
        written = stream.getvalue()
        assert (f"{found.checked}/{found.checked} files" in written) is tty
        assert written.endswith("\r") if tty else written == ""


@pytest.mark.process
def test_a_worker_whose_command_died_ends_quietly(tmp_path: Path) -> None:
    """A worker whose command is gone (killed mid-batch: its end of the reply pipe closed)
    ends at the broken pipe with nothing on the terminal the command shared with it."""
    proc = subprocess.Popen(
        [sys.executable, "-I", hash_files.__file__, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.close()
        _, err = proc.communicate(f"sha256:{'a' * 64} 3\n\n".encode(), timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert err == b""
    assert proc.returncode == 0


async def test_a_drift_of_the_running_totals_is_reported_and_only_repair_rebuilds_it(
    running,
) -> None:
    """Totals that differ from a recount (a bug, a hand edit): plain fsck names each one and
    changes nothing; --repair rebuilds them from the rows."""
    reg, config = running
    root = config.storage.root
    db = sqlite3.connect(root / "index.db", isolation_level=None)
    try:
        db.execute("UPDATE totals SET stored_bytes = stored_bytes + 5, tags = tags + 2")
    finally:
        db.close()
    counted = await reg.db.read(Index.recount)
    want = {
        "stored_bytes": (counted.stored_bytes + 5, counted.stored_bytes),
        "tags": (counted.tags + 2, counted.tags),
    }
    before = snapshot(root)
    found = await fsck(config)
    assert found.drift == want and not found.damaged
    lines = found.lines()
    kept, recounted = want["stored_bytes"]
    assert f"totals drift stored_bytes: kept {kept}, counted {recounted}" in lines
    assert "run fsck --repair to rebuild the totals" in lines[-1], lines
    assert snapshot(root) == before  # reported, not changed

    repaired = await fsck(config, repair=True)
    assert repaired.drift == want
    assert "(rebuilt)" in "\n".join(repaired.lines())
    assert await reg.db.read(Index.totals) == counted
    assert not (await fsck(config)).drift
