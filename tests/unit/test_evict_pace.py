"""Eviction rests between batches while the event loop is busy, unless short of disk
(regproxy.evict_pace), in-process over a real store and index."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from regproxy.config import config_from_dict
from regproxy.evict import Evictor
from regproxy.evict_pace import MAX_REST, Pace
from tests.unit.test_evict import NOW, Shop, layer, up
from tests.unit.test_evict import shop as shop  # the fixture: a registry over a real store


class Clocks:
    """A wall clock and the loop thread's CPU clock, moved by hand; sleeps are recorded."""

    def __init__(self, busy: float) -> None:
        self.now = self.cpu = 0.0
        self.busy = busy  # the loop's share of a core while time passes
        self.slept: list[float] = []

    def pass_time(self, seconds: float) -> None:
        self.now += seconds
        self.cpu += self.busy * seconds

    def wall(self) -> float:
        # every look at the clock sees a batch step of 10 ms pass
        self.pass_time(0.010)
        return self.now

    def thread_cpu(self) -> float:
        return self.cpu

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def pace(self) -> Pace:
        return Pace(wall=self.wall, cpu=self.thread_cpu, sleep=self.sleep)


def test_rests_as_long_as_the_step_took_while_the_loop_is_busy() -> None:
    busy = Clocks(busy=0.9)
    pace = busy.pace()
    pace.begin()
    busy.pass_time(0.030)
    assert pace.rest_for() == pytest.approx(0.040)  # 30 ms passed, and 10 ms for the look
    busy.pass_time(5.0)  # a step that waited long for the index: capped
    assert pace.rest_for() == MAX_REST

    idle = Clocks(busy=0.2)
    pace = idle.pace()
    pace.begin()
    idle.pass_time(0.030)
    assert pace.rest_for() == 0.0


async def _stocked(shop: Shop) -> None:
    for i in range(4):
        await shop.image(up(f"team/u{i}"), "v1", [layer(f"u{i}")], at=200.0 + i)


@pytest.mark.parametrize("busy", [0.9, 0.1])
async def test_above_max_size_the_batches_rest_only_while_the_loop_is_busy(
    shop: Shop, tmp_path: Path, busy: float
) -> None:
    await _stocked(shop)
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1000, "min_free": 0}}
    )
    clocks = Clocks(busy)
    r = await Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace).check()
    assert r is not None and r.manifests == 4 and r.batches >= 2
    if busy > 0.5:
        # between the loose batch and the first of manifests, and between those: none after
        # the last
        assert len(clocks.slept) == r.batches - 1
        assert all(0 < s <= MAX_REST for s in clocks.slept)
    else:
        assert clocks.slept == []


async def test_short_of_disk_it_never_rests(shop: Shop, tmp_path: Path) -> None:
    await _stocked(shop)
    # min_free above the free space of any test machine's disk: short of disk
    config = config_from_dict({"storage": {"root": str(tmp_path / "store"), "min_free": "99%"}})
    clocks = Clocks(busy=1.0)
    r = await Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace).check()
    assert r is not None and r.manifests == 4 and r.batches >= 2
    assert clocks.slept == []
    # a transfer's room (make_room) does not rest either
    await _stocked(shop)
    clocks = Clocks(busy=1.0)
    evictor = Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace)
    assert await evictor.make_room(1) > 0
    assert clocks.slept == []


async def test_a_transfer_waiting_for_room_stops_the_rests(shop: Shop, tmp_path: Path) -> None:
    await _stocked(shop)
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1000, "min_free": 0}}
    )
    clocks = Clocks(busy=1.0)
    evictor = Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace)
    alone = await evictor.check()
    assert alone is not None and alone.manifests == 4 and len(clocks.slept) == alone.batches - 1
    assert clocks.slept  # the loose batch, then the manifests': one rest between

    await _stocked(shop)
    clocks = Clocks(busy=1.0)
    evictor = Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace)
    round_ = asyncio.create_task(evictor.check())
    for _ in range(100):  # until the round holds the evictor (it flushes access times first)
        await asyncio.sleep(0)
        if evictor._lock.locked():
            break
    assert evictor._lock.locked()
    room = asyncio.create_task(evictor.make_room(1))  # a transfer waits for the round
    r = await round_
    assert r is not None and r.manifests == 4 and r.batches == alone.batches
    assert clocks.slept == []  # no rest while the transfer waited
    assert await room >= 0


async def test_a_round_stops_resting_once_the_disk_runs_short(shop: Shop, tmp_path: Path) -> None:
    await _stocked(shop)
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1000, "min_free": 1000}}
    )
    looks: list[int] = []

    def disk_usage() -> tuple[int, int]:
        # plenty free when the round starts (above max_size only: paced); then something
        # else on the filesystem fills it
        looks.append(1)
        return 10**12, 10**11 if len(looks) == 1 else 0

    shop.reg.store.disk_usage = disk_usage  # type: ignore[method-assign]
    clocks = Clocks(busy=1.0)
    r = await Evictor(shop.reg, config, clock=lambda: NOW, pace=clocks.pace).check()
    assert r is not None and r.manifests == 4 and r.batches >= 2 and len(looks) >= 2
    assert clocks.slept == []
