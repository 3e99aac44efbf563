"""Peer liveness: backoff from about a second, doubling to the cap; a probe brings a peer back."""

from __future__ import annotations

from regproxy.liveness import Liveness


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_failures_back_off_exponentially_up_to_the_cap() -> None:
    clock = Clock()
    live = Liveness(clock, lambda: 1.0, first=1.0, cap=30.0, every=30.0)
    live.keep(["p"])
    assert live.due() == ["p"]  # a new peer is probed at once
    assert not live.is_up("p")
    waits = [live.failed("p", "refused") for _ in range(8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert live.counts() == (0, 1)


def test_jitter_keeps_the_first_backoff_short() -> None:
    live = Liveness(Clock(), lambda: 0.0, first=1.0, cap=30.0)
    assert live.failed("p", "refused") == 0.5  # hosts booting together probe within a second


def test_a_peer_is_probed_when_due_and_a_success_resets_it() -> None:
    clock = Clock()
    live = Liveness(clock, lambda: 1.0, first=1.0, cap=30.0, every=30.0)
    live.keep(["p", "q"])
    live.ok("q")
    live.failed("p", "refused")
    live.failed("p", "refused")  # 2 s
    assert live.due() == []
    clock.t += 1.9
    assert live.due() == []
    clock.t += 0.2
    assert live.due() == ["p"]
    live.ok("p")
    assert live.is_up("p") and live.state("p").failures == 0
    assert live.due() == []
    clock.t += 30.0  # up peers are probed every `every`
    assert sorted(live.due()) == ["p", "q"]


def test_a_peer_that_lied_is_held_for_the_cap() -> None:
    clock = Clock()
    live = Liveness(clock, lambda: 1.0, first=1.0, cap=30.0)
    live.ok("p")
    assert live.failed("p", "wrong bytes", hold=30.0) == 30.0
    assert not live.is_up("p")
    live.keep(["q"])  # dropped from the list: forgotten
    assert not live.is_up("p") and live.due() == ["q"]
