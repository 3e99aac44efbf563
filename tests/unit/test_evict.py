"""Eviction between watermarks over a real store and index, in-process (regproxy.evict)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.config import config_from_dict
from regproxy.evict import Evictor, Watermarks
from regproxy.index import Index
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry, Registry
from regproxy.store import Store

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER = 10_000
NOW = 2_000_000_000.0  # the evictor's clock; every access below is long before it


def up(path: str) -> RepoName:
    return RepoName(f"spectro-images/docker.io/{path}", "docker.io", path)


def desc(data: bytes, media_type: str) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


def manifest(config: bytes, layers: list[bytes], subject: bytes | None = None) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": desc(config, "application/vnd.oci.image.config.v1+json"),
        "layers": [desc(b, "application/vnd.oci.image.layer.v1.tar") for b in layers],
    }
    if subject is not None:
        doc["subject"] = desc(subject, OCI_MANIFEST)
    return json.dumps(doc).encode()


async def chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Shop:
    """A registry with images stored the way pulls and pushes store them, and access times
    set by hand (the LRU order)."""

    def __init__(self, reg: Registry) -> None:
        self.reg = reg

    async def image(
        self,
        repo: RepoName,
        tag: str,
        layers: list[bytes],
        *,
        pinned: bool = False,
        subject: bytes | None = None,
        at: float | None = None,
    ) -> bytes:
        config = json.dumps({"for": tag, "repo": repo.canonical, "s": bool(subject)}).encode()
        for b in (config, *layers):
            await self.reg.uploads.monolithic(repo, Digest.of(b), chunks(b), len(b))
        body = manifest(config, layers, subject)
        ref = str(Digest.of(body)) if subject is not None else tag
        await self.reg.put_manifest(repo, ref, body, OCI_MANIFEST, pinned=pinned)
        if at is not None:
            await self.touch(repo, body, at)
        return body

    async def index(self, repo: RepoName, tag: str, children: list[bytes], at: float) -> bytes:
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {**desc(c, OCI_MANIFEST), "platform": {"os": "linux", "architecture": a}}
                    for c, a in zip(children, ("amd64", "arm64"), strict=False)
                ],
            }
        ).encode()
        await self.reg.put_manifest(repo, tag, body, OCI_INDEX, pinned=False)
        for b in (body, *children):
            await self.touch(repo, b, at)
        return body

    async def touch(self, repo: RepoName, body: bytes, at: float) -> None:
        await self.reg.flush_access()
        await self.reg.db.write(
            lambda ix: ix.db.execute(
                "UPDATE repo_manifests SET last_access=? WHERE repo=? AND digest=?",
                (at, repo.canonical, str(Digest.of(body))),
            )
        )

    def has_file(self, data: bytes) -> bool:
        return self.reg.store.stat(Digest.of(data)) is not None

    async def held(self, repo: RepoName, body: bytes) -> bool:
        return (
            await self.reg.db.read(Index.manifest_in_repo, repo.canonical, str(Digest.of(body)))
            is not None
        )


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    root = tmp_path / "store"
    reg = LocalRegistry(Store(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield Shop(reg)
    await reg.close()


def layer(name: str) -> bytes:
    return (name.encode() * LAYER)[:LAYER]


async def test_eviction_runs_between_the_watermarks_and_keeps_pinned_and_shared(
    shop: Shop, tmp_path: Path
) -> None:
    shared, pinned_layer = layer("shared"), layer("pinned-too")
    # pinned: a pushed image, the oldest of all; its layer is also in an unpinned image
    pushed = await shop.image(
        RepoName("spectro-images/mine/app"), "v1", [pinned_layer], pinned=True, at=100.0
    )
    old = [
        await shop.image(up(f"team/u{i}"), "v1", [layer(f"u{i}")], at=200.0 + i) for i in range(6)
    ]
    # shares the pinned layer (it stays) and "shared" with a newer image (it stays too)
    mixed = await shop.image(up("team/mixed"), "v1", [pinned_layer, shared], at=150.0)
    newer = await shop.image(up("team/newer"), "v1", [shared], at=900.0)
    # an index (with two children) and a signature of u0 go as units with their roots
    kids = [await shop.image(up("team/multi"), f"c{i}", [layer(f"kid{i}")]) for i in range(2)]
    multi = await shop.index(up("team/multi"), "latest", kids, at=205.5)
    sig = await shop.image(up("team/u0"), "sig", [layer("sig")], subject=old[0], at=950.0)
    recent = await shop.image(up("team/recent"), "v1", [layer("recent")], at=NOW - 1)

    totals = await shop.reg.db.read(Index.totals)
    high = totals.stored_bytes - 4 * LAYER  # a limit the store is above
    config = config_from_dict(
        {
            "storage": {
                "root": str(tmp_path / "store"),
                "max_size": high,
                "evict_to": "50%",
                "min_free": 0,
            }
        }
    )
    evictor = Evictor(shop.reg, config, clock=lambda: NOW)
    r = await evictor.check()
    assert r is not None and r.freed > 0 and r.short == 0
    after = await shop.reg.db.read(Index.totals)
    low = int(high * 0.5)
    # between the watermarks: at or under evict_to, and no more than one unit under it
    assert after.stored_bytes <= low
    assert after.stored_bytes > low - 3 * LAYER - 2000
    assert after == await shop.reg.db.read(Index.recount)

    # least recently used first: mixed (150), u0 (200, its signature with it), u1, ...
    assert not await shop.held(up("team/mixed"), mixed)
    assert not await shop.held(up("team/u0"), old[0]) and not await shop.held(up("team/u0"), sig)
    assert not shop.has_file(old[0]) and not shop.has_file(layer("u0"))
    assert not shop.has_file(sig) and not shop.has_file(layer("sig"))
    # the index went with both children (at 205.5, after u1..u5), which it stopped after
    assert not await shop.held(up("team/multi"), multi)
    assert not any([await shop.held(up("team/multi"), k) for k in kids])
    assert not shop.has_file(layer("kid0")) and not shop.has_file(multi)
    # pinned, shared with a kept manifest, and recent content stayed, with their files
    assert await shop.held(RepoName("spectro-images/mine/app"), pushed)
    assert shop.has_file(pushed) and shop.has_file(pinned_layer)
    assert await shop.held(up("team/newer"), newer) and shop.has_file(shared)
    assert await shop.held(up("team/recent"), recent) and shop.has_file(layer("recent"))
    # every blob the index still lists is on disk
    for d, size in await shop.reg.db.read(
        lambda ix: ix.db.execute("SELECT digest, size FROM refs WHERE size IS NOT NULL").fetchall()
    ):
        assert shop.reg.store.stat(Digest.parse(d)) == size, d

    # under the low watermark now: the next check evicts nothing
    assert await evictor.check() is None


async def test_nothing_pinned_referenced_or_in_use_goes_even_when_short(
    shop: Shop, tmp_path: Path
) -> None:
    a = await shop.image(
        RepoName("spectro-images/mine/a"), "v1", [layer("a")], pinned=True, at=100.0
    )
    now = time.time()  # the loose blob's access time is the real time of its push
    b = await shop.image(up("team/b"), "v1", [layer("b")], at=now - 2)  # in use
    loose = layer("loose")  # a blob nothing references, pushed just now (upload_ttl guards it)
    await shop.reg.uploads.monolithic(up("team/b"), Digest.of(loose), chunks(loose), len(loose))
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1000, "min_free": 0}}
    )
    r = await Evictor(shop.reg, config, clock=lambda: now).check()
    assert r is not None and r.freed == 0 and r.short > 0
    assert await shop.held(RepoName("spectro-images/mine/a"), a) and shop.has_file(layer("a"))
    assert await shop.held(up("team/b"), b) and shop.has_file(loose)
    # once the loose blob is older than upload_ttl it goes first
    later = now + 86400 * 2
    r = await Evictor(shop.reg, config, clock=lambda: later).evict(1)
    assert r.loose == 1 and not shop.has_file(loose)
    assert await shop.held(up("team/b"), b)


async def test_short_of_min_free_a_round_takes_what_may_go_and_keeps_the_rest(
    shop: Shop, tmp_path: Path
) -> None:
    """No size limit, but the filesystem under ``min_free`` (99% of the test disk: never
    reached, whatever goes): one round takes everything that may go, loose content first, and
    keeps what is pinned, referenced by a kept manifest or in use, with their files."""
    pinned_layer, shared = layer("pinned"), layer("shared-with-recent")
    pushed = await shop.image(
        RepoName("spectro-images/mine/app"), "v1", [pinned_layer], pinned=True, at=100.0
    )
    mixed = await shop.image(up("team/mixed"), "v1", [pinned_layer, layer("mixed")], at=150.0)
    older = await shop.image(up("team/older"), "v1", [shared], at=160.0)
    recent = await shop.image(up("team/recent"), "v1", [shared, layer("recent")], at=NOW - 1)
    old = [await shop.image(up(f"team/o{i}"), "v1", [layer(f"o{i}")], at=200.0 + i) for i in (0, 1)]
    sig = await shop.image(up("team/o0"), "sig", [layer("sig")], subject=old[0], at=250.0)
    loose = layer("loose")  # pushed by digest alone, long before the evictor's clock
    await shop.reg.uploads.monolithic(up("team/o1"), Digest.of(loose), chunks(loose), LAYER)
    config = config_from_dict({"storage": {"root": str(tmp_path / "store"), "min_free": "99%"}})
    r = await Evictor(shop.reg, config, clock=lambda: NOW).check()
    assert r is not None and r.short > 0  # the floor is out of reach: said, not looped on
    assert r.loose == 1 and r.manifests == 4  # mixed, older, o0 (its signature with it), o1
    assert not shop.has_file(loose)
    for repo, body, own in (
        ("team/mixed", mixed, "mixed"),
        ("team/older", older, None),
        ("team/o0", old[0], "o0"),
        ("team/o0", sig, "sig"),
        ("team/o1", old[1], "o1"),
    ):
        assert not await shop.held(up(repo), body) and not shop.has_file(body), repo
        assert own is None or not shop.has_file(layer(own)), own
    # pinned (its layer too, though an evicted image listed it), shared with a manifest in
    # use, and in use: kept, with their files
    assert await shop.held(RepoName("spectro-images/mine/app"), pushed)
    assert shop.has_file(pushed) and shop.has_file(pinned_layer)
    assert await shop.held(up("team/recent"), recent)
    assert shop.has_file(recent) and shop.has_file(shared) and shop.has_file(layer("recent"))
    assert await shop.reg.db.read(Index.totals) == await shop.reg.db.read(Index.recount)
    for d, size in await shop.reg.db.read(
        lambda ix: ix.db.execute("SELECT digest, size FROM refs WHERE size IS NOT NULL").fetchall()
    ):
        assert shop.reg.store.stat(Digest.parse(d)) == size, d
    # the next round finds nothing more that may go
    again = await Evictor(shop.reg, config, clock=lambda: NOW).check()
    assert again is not None and again.freed == 0


def test_watermarks() -> None:
    storage = config_from_dict(
        {"storage": {"root": "/x", "max_size": "1000", "min_free": "10%"}}
    ).storage
    marks = Watermarks.of(storage, 10_000)
    assert (marks.limit, marks.low, marks.floor, marks.floor_target) == (1000, 900, 1000, 1111)
    assert marks.need(stored=1000, free=5000) == 0  # at the limit: nothing to do
    assert marks.need(stored=1001, free=5000) == 101  # above it: down to evict_to
    assert marks.need(stored=500, free=999) == 112  # under min_free: up to min_free / 0.9
    absolute = config_from_dict(
        {"storage": {"root": "/x", "max_size": "1000", "evict_to": 500, "min_free": 0}}
    ).storage
    assert Watermarks.of(absolute, 10_000).low == 500


async def test_a_batch_whose_budget_is_spent_at_once_still_makes_progress(shop: Shop) -> None:
    """A slow disk (or a long wait for the writer) may spend a batch's time before its first
    candidate: the batch still deals with one, so a round never spins evicting nothing."""
    from regproxy.evict_batch import evict_loose, evict_lru

    bodies = [
        await shop.image(up(f"team/s{i}"), "v1", [layer(f"s{i}")], at=100.0 + i) for i in range(3)
    ]
    for i in range(2):
        loose = layer(f"loose{i}")
        await shop.reg.uploads.monolithic(up("team/s0"), Digest.of(loose), chunks(loose), LAYER)
    start = (float("-inf"), "", "")
    batch = await shop.reg.db.write(
        evict_lru, 10**9, start, now=NOW, in_use=0.0, busy=(), budget=-1.0
    )
    # one go of units at least (a chunk of them: see evict_batch.CHUNK), oldest first
    assert batch.evicted and batch.evicted[0].digest == str(Digest.of(bodies[0]))
    assert batch.after_row != start and not await shop.held(up("team/s0"), bodies[0])
    # a unit that took long in the go before: the next go takes as many as fit the budget
    # (one at least), so a busy host's batch stays short for the writes behind it
    more = [
        await shop.image(up(f"team/t{i}"), "v1", [layer(f"t{i}")], at=200.0 + i) for i in range(3)
    ]
    slow = await shop.reg.db.write(
        evict_lru,
        10**9,
        batch.after_row,
        now=NOW,
        in_use=0.0,
        busy=(),
        budget=-1.0,
        unit_seconds=1.0,
    )
    assert [e.digest for e in slow.evicted] == [str(Digest.of(more[0]))]
    assert 0 < slow.unit_seconds < 1.0  # measured again: what the next batch starts from
    batch = await shop.reg.db.write(evict_loose, 10**9, "", before=4e9, busy=(), budget=-1.0)
    assert len(batch.evicted) == 1 and batch.after_digest


async def test_the_unlinker_keeps_a_file_stored_again(shop: Shop) -> None:
    """A batch's files are deleted after the next batch began: a digest committed again since
    (stored in the index) keeps its file, and nothing is left in tmp/."""
    from regproxy.evict import _Unlinker

    repo = up("team/u")
    stored, gone = layer("stored"), layer("gone")
    for b in (stored, gone):
        await shop.reg.uploads.monolithic(repo, Digest.of(b), chunks(b), len(b))
    went = json.dumps([str(Digest.of(gone))])
    await shop.reg.db.write(  # their rows went with a batch; their files are still there
        lambda ix: ix.db.execute(
            "DELETE FROM blobs WHERE digest IN (SELECT value FROM json_each(?))", (went,)
        )
    )
    unlinker = _Unlinker(shop.reg)
    try:
        await unlinker.delete([str(Digest.of(b)) for b in (stored, gone)])
    finally:
        unlinker.close()
    assert shop.has_file(stored) and not shop.has_file(gone)
    assert shop.reg.store.read(Digest.of(stored)) == stored
    assert list(shop.reg.store.tmp.iterdir()) == []


async def test_background_writes_take_the_writers_turn_at_a_lower_priority(tmp_path: Path) -> None:
    """An eviction batch runs on the writer's connection, in its turn, on a thread whose CPU
    priority is lower than the daemon's (AsyncIndex.write_background)."""
    import os
    import threading

    db = AsyncIndex(tmp_path / "index.db")
    await db.open()
    try:

        def where(ix: Index) -> tuple[str, int, bool, str]:
            tid = threading.get_native_id()
            return (
                threading.current_thread().name,
                os.getpriority(os.PRIO_PROCESS, tid),
                ix.readonly,
                Path(f"/proc/self/task/{tid}/comm").read_text().strip(),
            )

        name, nice, readonly, comm = await db.write_background(where)
        assert name.startswith("regproxy-index-bg") and not readonly
        assert comm == "index-bg_0"  # the kernel's name too (regproxy.thread_names)
        assert nice > os.getpriority(os.PRIO_PROCESS, 0) or nice == 19
        await db.write_background(lambda ix: ix.ensure_repo("spectro-images/x", None, "x"))
        assert await db.read(Index.repo_exists, "spectro-images/x")
    finally:
        await db.close()


async def test_a_batch_out_of_time_mid_page_is_not_the_end_of_the_walk(shop: Shop) -> None:
    """A page that ends with a unit in use marks the walk's end, but only once its fresh
    candidates are dealt with: a batch whose time runs out before that (a slow disk, a busy
    machine) leaves the walk open, and the next batch goes on from its cursor."""
    from regproxy.evict import IN_USE_SECONDS
    from regproxy.evict_batch import evict_lru

    old = [
        await shop.image(up(f"team/o{i}"), "v1", [layer(f"o{i}")], at=300.0 + i) for i in range(40)
    ]
    await shop.image(up("team/now"), "v1", [layer("now")], at=NOW - 1)  # in use: the page's end
    start = (float("-inf"), "", "")
    first = await shop.reg.db.write(
        evict_lru, 1 << 40, start, now=NOW, in_use=IN_USE_SECONDS, busy=(), budget=0.0
    )
    assert 0 < len(first.evicted) < len(old)
    assert not first.exhausted  # out of time, not out of candidates
    rest = await shop.reg.db.write(
        evict_lru, 1 << 40, first.after_row, now=NOW, in_use=IN_USE_SECONDS, busy=()
    )
    assert len(first.evicted) + len(rest.evicted) == len(old) and rest.exhausted


def test_a_go_takes_no_more_units_than_fit_in_the_budget_left() -> None:
    from regproxy.evict_batch import CHUNK, FIRST_GO, go_size

    assert go_size(CHUNK, 0.02, 0.0, moved=False) == FIRST_GO  # nothing measured: a small go
    assert go_size(CHUNK, 0.02, 0.001, moved=True) == 20
    assert go_size(CHUNK, 0.02, 0.00001, moved=True) == CHUNK
    assert go_size(3, 0.02, 0.001, moved=True) == 3  # what the bytes still to free suggest
    assert go_size(CHUNK, 0.0005, 0.001, moved=True) == 0  # not one more fits: the batch ends
    assert go_size(CHUNK, -1.0, 0.001, moved=False) == 1  # but every batch deals with one
    for unit in (0.00001, 0.0007, 0.001, 0.004, 0.03, 1.0):
        for left in (-0.01, 0.0, 0.001, 0.0099, 0.02, 0.05):
            n = go_size(CHUNK, left, unit, moved=True)
            assert 0 <= n <= CHUNK and n * unit <= max(left, 0.0), (unit, left, n)


async def test_a_batch_sizes_its_goes_of_units_by_the_budget(shop: Shop) -> None:
    """A go of units cannot stop halfway: a round's first go (no time per unit known yet) takes
    a few, and with a time per unit known a go takes no more than fit in the batch's budget.
    The go sizes are read from the writer's statements (the candidates of each units query)."""
    from regproxy.evict_batch import FIRST_GO, evict_lru

    gos: list[int] = []

    def seen(sql: str) -> None:
        if "roots(repo, root)" in sql:
            gos.append(sql.count("sha256:"))

    await shop.reg.db.write(lambda ix: ix.db.set_trace_callback(seen))
    start = (float("-inf"), "", "")
    try:
        for i in range(2 * FIRST_GO + 2):
            await shop.image(up(f"team/g{i}"), "v1", [layer(f"g{i}")], at=100.0 + i)
        first = await shop.reg.db.write(
            evict_lru, 1 << 40, start, now=NOW, in_use=0.0, busy=(), budget=60.0
        )
        assert len(first.evicted) == 2 * FIRST_GO + 2 and first.exhausted
        assert gos[0] == FIRST_GO and sum(gos) == 2 * FIRST_GO + 2, gos
        assert first.unit_seconds > 0  # measured: where the next batch starts from

        gos.clear()
        for i in range(8):
            await shop.image(up(f"team/h{i}"), "v1", [layer(f"h{i}")], at=300.0 + i)
        # 8 ms a unit: 2 fit a 20 ms budget (fewer once the batch's own time is counted)
        second = await shop.reg.db.write(
            evict_lru, 1 << 40, start, now=NOW, in_use=0.0, busy=(), unit_seconds=0.008
        )
        assert second.evicted and 1 <= gos[0] <= 2, gos
    finally:
        await shop.reg.db.write(lambda ix: ix.db.set_trace_callback(None))
