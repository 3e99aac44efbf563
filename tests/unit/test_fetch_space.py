"""A transfer's room (regproxy.space inside regproxy.fetch): reserved before the first byte,
the same refusal for every waiter, released however the transfer ends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from regproxy.config import config_from_dict
from regproxy.errors import UpstreamError
from regproxy.fetch import Fetcher, Source, Stream
from regproxy.oci import Digest
from regproxy.space import NoRoom, Space
from regproxy.store import Store

DATA = bytes(range(256)) * 400  # 100 KiB: copied on the loop
DIGEST = Digest.of(DATA)


class Disk:
    def __init__(self, free: int) -> None:
        self.free = free

    def usage(self) -> tuple[int, int]:
        return 1 << 40, self.free

    async def stored(self) -> int:
        return 0


class Body:
    """The blob's body from a source of the test's own: half, then (once ``go`` is set) the
    rest, or ``fail`` instead of the rest."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.go = asyncio.Event()
        self.fail = fail
        self.opens = 0

    async def open(self, digest: Digest, offset: int) -> Stream:
        self.opens += 1
        return _Stream(self, offset)


class _Stream:
    """Always the whole body (a Range is ignored: the fetcher skips what it has)."""

    source, offset = "up.test", 0

    def __init__(self, body: Body, offset: int) -> None:
        self.body, self.size = body, len(DATA)

    async def chunks(self) -> AsyncIterator[bytes]:
        half = len(DATA) // 2  # two chunks: a chunk lands in the file as the next arrives
        yield DATA[: half // 2]
        yield DATA[half // 2 : half]
        await self.body.go.wait()
        if self.body.fail is not None:
            raise self.body.fail
        yield DATA[half:]

    async def close(self) -> None:
        pass


@pytest.fixture
async def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.open()
    return s


def fetcher(store: Store, disk: Disk) -> tuple[Fetcher, Space]:
    cfg = config_from_dict({"storage": {"root": str(store.root), "min_free": 0}})
    space = Space(cfg.storage, disk.usage, disk.stored)

    async def on_commit(digest: Digest, size: int, repo: str, source: str) -> None:
        pass

    return Fetcher(store, on_commit, space=space), space


def temp_files(store: Store) -> list[Path]:
    return list(store.tmp.iterdir())


async def test_every_waiter_of_a_blob_with_no_room_gets_507_before_a_byte(store: Store) -> None:
    """Three requests joined one transfer while eviction was asked for room: one upstream
    request, and all three get the same 507 when none could be made; nothing reserved after."""
    f, space = fetcher(store, Disk(free=len(DATA) - 1))
    asked, evicted = asyncio.Event(), asyncio.Event()

    async def make_room(need: int) -> int:
        asked.set()
        await evicted.wait()
        return 0  # everything is pinned or in use

    space.room_from(make_room)
    body = Body()
    sources = [Source("up.test", "upstream", body.open)]
    transfers = [f.start(DIGEST, sources, "docker.io/a") for _ in range(3)]
    assert transfers[0] is transfers[1] is transfers[2]
    waiting = [asyncio.create_task(t.wait_size()) for t in transfers]
    await asyncio.wait_for(asked.wait(), 30)
    assert not any(w.done() for w in waiting)
    evicted.set()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, NoRoom) and r.http_status == 507 for r in results), results
    assert transfers[0].written == 0 and body.opens == 1
    assert space.reserved == 0 and not f.inflight and temp_files(store) == []
    await f.drain(0)


async def outcome(store: Store, end: str) -> tuple[list[int], Fetcher]:
    """A transfer that has its room and its first half, then ends as ``end`` says."""
    f, space = fetcher(store, Disk(free=1 << 30))
    body = Body(fail=UpstreamError("up.test", "403", kind="4xx") if end == "failure" else None)
    t = f.start(DIGEST, [Source("up.test", "upstream", body.open)], "docker.io/a")
    reserved: list[int] = []
    await t.wait_begun()
    reserved.append(space.reserved)
    if end == "client gone":  # a response that read a little and hung up

        async def read_a_little() -> None:
            async with contextlib.aclosing(t.read_range(0, len(DATA) - 1)) as chunks:
                async for _ in chunks:
                    break

        await read_a_little()
        assert not t.done  # the response went: the transfer goes on
    if end == "cancelled":
        await f.drain(0)  # shutdown cuts it
    else:
        body.go.set()
        with contextlib.suppress(UpstreamError, NoRoom):
            await t.wait_done()
    reserved.append(space.reserved)
    return reserved, f


@pytest.mark.parametrize("end", ["success", "failure", "cancelled", "client gone"])
async def test_the_room_is_released_however_the_transfer_ends(store: Store, end: str) -> None:
    reserved, f = await outcome(store, end)
    assert reserved == [len(DATA), 0]
    assert not f.inflight and temp_files(store) == []
    committed = store.stat(DIGEST) == len(DATA)
    assert committed == (end in ("success", "client gone"))
    await f.drain(0)


async def test_a_reader_cut_by_the_last_sources_failure_finds_the_transfer_gone(
    store: Store,
) -> None:
    """The only source fails after some bytes went out: the response reading them is cut,
    and by then the transfer is out of the fetcher, so a client that asks again at once
    starts a new one instead of joining the one that is ending (it got a second failure)."""
    f, _ = fetcher(store, Disk(free=1 << 30))
    body = Body(fail=UpstreamError("up.test", "slow", kind="slow"))
    sources = [Source("up.test", "upstream", body.open)]
    t = f.start(DIGEST, sources, "docker.io/a")
    seen: list[object] = []

    async def read() -> None:
        async for _ in t.read_range(0, len(DATA) - 1):
            seen.append(f.get(DIGEST))
            body.go.set()  # bytes went out: now the source fails

    with pytest.raises(UpstreamError):
        await read()
    assert seen  # it read bytes before the cut
    assert f.get(DIGEST) is None  # at the cut, nothing to join
    again = f.start(DIGEST, [Source("up.test", "upstream", Body().open)], "docker.io/a")
    assert again is not t
    await f.drain(0)
