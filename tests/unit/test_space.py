"""Room for pull-through blobs (regproxy.space), on a disk and a store of the test's own."""

from __future__ import annotations

import asyncio
import logging

import pytest

from regproxy.config import config_from_dict
from regproxy.metrics import Metrics
from regproxy.oci import Digest
from regproxy.space import NoRoom, Space

GiB = 1 << 30
D = Digest.of(b"a blob")


class Disk:
    """A filesystem of ``total`` bytes with ``free`` left, and a store holding ``stored``."""

    def __init__(self, total: int, free: int, stored: int = 0) -> None:
        self.total, self.free, self.stored = total, free, stored

    def usage(self) -> tuple[int, int]:
        return self.total, self.free

    async def stored_bytes(self) -> int:
        return self.stored


def space(disk: Disk, metrics: Metrics | None = None, **storage: object) -> Space:
    cfg = config_from_dict({"storage": {"root": "/nonexistent", "min_free": 0, **storage}})
    return Space(cfg.storage, disk.usage, disk.stored_bytes, metrics)


def refused(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value("regproxy_fetch_refused_total", {"reason": reason}) or 0.0


async def reserve(s: Space, key: object, size: int, written: int = 0) -> None:
    await s.reserve(key, size, lambda: written, digest=D, repo="docker.io/a", source="up")


async def test_two_misses_that_do_not_both_fit_do_not_both_start() -> None:
    """3 GiB and 3 GiB on 5 GiB free: one is reserved, the other refused, even when both
    measure at the same time; once the first is released the second fits."""
    m = Metrics()
    s = space(Disk(100 * GiB, 5 * GiB), m)
    results = await asyncio.gather(
        reserve(s, "one", 3 * GiB), reserve(s, "two", 3 * GiB), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["NoRoom", "NoneType"]
    assert s.reserved == 3 * GiB
    assert refused(m, "no_space") == 1
    winner = "one" if results[0] is None else "two"
    s.release(winner)
    assert s.reserved == 0
    await reserve(s, "three", 3 * GiB)
    assert s.reserved == 3 * GiB


async def test_bytes_already_written_are_not_counted_twice() -> None:
    """A transfer 2 of its 3 GiB in: the filesystem counts those 2 GiB, the reservation only
    the GiB still to come."""
    disk = Disk(100 * GiB, 5 * GiB)
    s = space(disk)
    await reserve(s, "one", 3 * GiB, written=2 * GiB)
    disk.free = 3 * GiB  # its 2 GiB landed
    await reserve(s, "two", 2 * GiB)  # 3 free - 1 to come = 2: fits exactly
    with pytest.raises(NoRoom):
        await reserve(s, "three", 1)


async def test_past_max_size_a_blob_is_fetched_and_eviction_started_not_waited_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """max_size is a target: the store and every reservation over it start an eviction round
    for the excess, and the blob is fetched at once, even when nothing can be evicted yet."""
    caplog.set_level(logging.INFO, "regproxy.space")
    m = Metrics()
    disk = Disk(100 * GiB, 90 * GiB, stored=6 * GiB)
    s = space(disk, m, max_size="10GiB")
    asked: list[int] = []
    go = asyncio.Event()

    async def make_room(need: int) -> int:
        asked.append(need)
        await go.wait()  # a round that takes its time (or frees nothing: all pinned)
        return 0

    s.room_from(make_room)
    await reserve(s, "one", 3 * GiB)
    assert not asked  # 9 of 10 GiB: under the target
    await reserve(s, "two", GiB + 5)  # 10 GiB + 5: over it
    await reserve(s, "three", GiB)  # a round runs already: not a second one
    await asyncio.sleep(0)
    assert asked == [5]
    assert s.reserved == 5 * GiB + 5
    assert refused(m, "no_space") == 0
    lines = [r.getMessage() for r in caplog.records if "fetch.over_max_size" in r.getMessage()]
    assert len(lines) == 2 and "over=5 " in lines[0] and f"digest={D}" in lines[0]
    go.set()
    await asyncio.gather(*s.asks)


async def test_min_free_is_kept() -> None:
    s = space(Disk(100 * GiB, 10 * GiB), min_free="8GiB")
    with pytest.raises(NoRoom):
        await reserve(s, "one", 2 * GiB + 1)
    await reserve(s, "one", 2 * GiB)


def floor_disk() -> tuple[Disk, Space]:
    """5 GiB free over a 4 GiB floor: a 3 GiB blob is 2 GiB short."""
    disk = Disk(100 * GiB, 5 * GiB, stored=50 * GiB)
    return disk, space(disk, Metrics(), min_free="4GiB", max_size="1000GiB")


async def test_eviction_is_asked_for_the_shortfall_once_then_it_fits() -> None:
    disk, s = floor_disk()
    asked: list[int] = []

    async def make_room(need: int) -> int:
        asked.append(need)
        disk.free += need
        return need

    s.room_from(make_room)
    await reserve(s, "one", 3 * GiB)
    assert asked == [2 * GiB]
    assert s.reserved == 3 * GiB


async def test_what_eviction_cannot_free_is_refused_with_the_numbers() -> None:
    _, s = floor_disk()
    asked: list[int] = []

    async def make_room(need: int) -> int:
        asked.append(need)
        return 0  # everything is pinned or in use

    s.room_from(make_room)
    with pytest.raises(NoRoom) as exc:
        await reserve(s, "one", 3 * GiB)
    assert asked == [2 * GiB]
    assert exc.value.http_status == 507
    assert f"{2 * GiB} bytes more than there is room for" in str(exc.value.detail)
    assert refused(s.metrics, "no_space") == 1
    assert s.reserved == 0


async def test_a_blob_larger_than_max_size_is_refused_without_evicting_anything(
    caplog: pytest.LogCaptureFixture,
) -> None:
    m = Metrics()
    s = space(Disk(100 * GiB, 90 * GiB), m, max_size="10GiB")

    async def make_room(need: int) -> int:
        raise AssertionError("nothing is evicted for a blob that can never fit")

    s.room_from(make_room)
    with pytest.raises(NoRoom, match="more than the cache may ever hold"):
        await reserve(s, "one", 10 * GiB + 1)
    assert refused(m, "too_large") == 1 and refused(m, "no_space") == 0
    line = next(r.getMessage() for r in caplog.records if "fetch.no_space" in r.getMessage())
    for part in (f"digest={D}", "repo=docker.io/a", "upstream=up", f"size={10 * GiB + 1}"):
        assert part in line
    assert "free=" in line and "reason=too_large" in line


async def test_a_round_that_does_not_end_in_time_is_not_waited_for_nor_cut() -> None:
    """The wait for room is bounded (here: none at all); the round goes on and is not cut."""
    disk, s = floor_disk()
    s.wait = 0.0
    go, finished = asyncio.Event(), asyncio.Event()

    async def make_room(need: int) -> int:
        await go.wait()
        disk.free += need
        finished.set()
        return need

    s.room_from(make_room)
    with pytest.raises(NoRoom):
        await reserve(s, "one", 3 * GiB)
    assert len(s.asks) == 1
    go.set()
    await finished.wait()
    await asyncio.gather(*s.asks)
    assert not s.asks
    await reserve(s, "one", 3 * GiB)  # the round freed it in the end


async def test_the_turn_to_ask_for_room_is_waited_for_a_bounded_time() -> None:
    """While one transfer's ask runs, another that does not fit waits for its turn at most
    ``wait`` (here: none), then is refused on what it measures; the first one goes on."""
    disk, s = floor_disk()
    s.wait = 0.0
    calls, inside, go = 0, asyncio.Event(), asyncio.Event()

    async def stored() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:  # the first transfer's measure once it has the turn: held there
            inside.set()
            await go.wait()
        return disk.stored

    async def make_room(need: int) -> int:
        disk.free += need
        return need

    s.stored = stored
    s.room_from(make_room)
    first = asyncio.create_task(reserve(s, "one", 3 * GiB))
    await inside.wait()
    with pytest.raises(NoRoom):
        await reserve(s, "two", 3 * GiB)
    s.wait = 30.0  # the first one's round is waited for
    go.set()
    await first
    assert s.reserved == 3 * GiB


async def test_stop_cuts_the_rounds_asked_for_and_starts_no_more() -> None:
    """At shutdown (Evictor.stop) a round a transfer started is cut and waited for, as the
    evictor's own round is: left running, it went on with its batches while the index closed."""
    disk = Disk(100 * GiB, 90 * GiB, stored=10 * GiB)
    s = space(disk, max_size="10GiB")
    started, cut = asyncio.Event(), asyncio.Event()

    async def make_room(need: int) -> int:
        started.set()
        try:
            await asyncio.Event().wait()  # a long round
        except asyncio.CancelledError:
            cut.set()
            raise
        return 0

    s.room_from(make_room)
    await reserve(s, "one", GiB)  # over the target: a round starts, not waited for
    await started.wait()
    await s.stop()
    assert cut.is_set() and not s.asks
    await reserve(s, "two", GiB)  # fetched; nobody to ask any more
    assert not s.asks


def upload_refused(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value("regproxy_upload_refused_total", {"reason": reason}) or 0.0


async def test_a_pushed_body_and_a_miss_share_the_room_above_the_floor() -> None:
    """10 GiB free, 5 GiB floor: a 3 GiB push held, a 3 GiB miss is refused, and the other way
    round; what a body already wrote is in the free bytes, not counted twice."""
    m = Metrics()
    disk = Disk(100 * GiB, 10 * GiB)
    s = space(disk, m, min_free="5GiB")
    await s.reserve_upload("push", 3 * GiB, lambda: 0, whole=3 * GiB, repo="r", uid="u")
    with pytest.raises(NoRoom, match="reserved by transfers in flight 3221225472"):
        await reserve(s, "miss", 3 * GiB)
    s.release("push")
    await reserve(s, "miss", 3 * GiB)
    with pytest.raises(NoRoom, match="upload u would hold"):
        await s.reserve_upload("push", 3 * GiB, lambda: 0, whole=3 * GiB, repo="r", uid="u")
    assert refused(m, "no_space") == 1 and upload_refused(m, "no_space") == 1
    s.release("miss")
    disk.free = 7 * GiB  # 3 GiB of the push's 4 are written: 1 GiB more to come
    await s.reserve_upload("push", 4 * GiB, lambda: 3 * GiB, whole=4 * GiB, repo="r", uid="u")
    assert s.reserved == 4 * GiB


async def test_a_streamed_step_that_does_not_fit_holds_what_is_left_above_the_floor() -> None:
    m = Metrics()
    s = space(Disk(100 * GiB, 6 * GiB), m, min_free="5GiB")
    held = await s.reserve_upload(
        "push", 2 * GiB, lambda: 0, whole=GiB // 2, repo="r", uid="u", at_least=GiB // 2
    )
    assert held == GiB and s.reserved == GiB and upload_refused(m, "no_space") == 0
    with pytest.raises(NoRoom, match=f"{GiB // 2} bytes more than there is room for"):
        await s.reserve_upload(
            "push",
            3 * GiB,
            lambda: 0,
            whole=GiB + GiB // 2,
            repo="r",
            uid="u",
            at_least=GiB + GiB // 2,
        )
    assert upload_refused(m, "no_space") == 1 and s.reserved == 0


async def test_a_push_larger_than_the_disk_less_its_floor_is_too_large() -> None:
    m = Metrics()
    s = space(Disk(10 * GiB, 10 * GiB), m, min_free="5GiB")
    with pytest.raises(NoRoom, match="more than the cache may ever hold"):
        await s.reserve_upload("push", GiB, lambda: 0, whole=6 * GiB, repo="r", uid="u")
    assert upload_refused(m, "too_large") == 1
