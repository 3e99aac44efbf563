"""Which peers are up: a failure sets a peer aside with an exponential backoff; a probe, not a
request, brings it back.

A peer that fails a request or a probe is *down*: requests skip it (no timeout paid per request)
and it is probed again when its backoff ends: ``first`` seconds after the first failure, doubling
with every failure in a row up to ``cap`` (each with jitter, so hosts that boot together do not
probe in step). A dead peer so costs one probe per interval, and hosts that start together find
each other within seconds instead of one refresh interval. A peer that answered is *up* and is
probed every ``every`` seconds. A peer that sent wrong bytes is put aside for ``cap`` at once.

Time comes from the clock handed in. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from regproxy.deadline import backoff


@dataclass(slots=True)
class PeerState:
    failures: int = 0  # failures in a row; 0: up
    known: bool = False  # probed (or asked) at least once
    due: float = 0.0  # when the next probe is due (on the clock)
    last_ok: float | None = None
    last_failure: float | None = None
    last_error: str = ""

    @property
    def up(self) -> bool:
        return self.known and self.failures == 0


class Liveness:
    def __init__(
        self,
        clock: Callable[[], float],
        rand: Callable[[], float],
        *,
        first: float = 1.0,
        cap: float = 30.0,
        every: float = 30.0,
    ) -> None:
        self.clock = clock
        self.rand = rand
        self.first = first
        self.cap = max(cap, first)
        self.every = every
        self._peers: dict[str, PeerState] = {}

    def keep(self, names: Iterable[str]) -> None:
        """The peer list is ``names`` now: new ones are due for a probe at once."""
        wanted = list(names)
        for name in list(self._peers):
            if name not in wanted:
                del self._peers[name]
        for name in wanted:
            self._peers.setdefault(name, PeerState())

    def state(self, name: str) -> PeerState:
        return self._peers.setdefault(name, PeerState())

    def is_up(self, name: str) -> bool:
        st = self._peers.get(name)
        return st is not None and st.up

    def ok(self, name: str) -> None:
        st = self.state(name)
        now = self.clock()
        st.failures, st.known, st.last_ok = 0, True, now
        st.due = now + self.every

    def failed(self, name: str, error: str, *, hold: float | None = None) -> float:
        """Set the peer aside; the seconds until it is probed again."""
        st = self.state(name)
        now = self.clock()
        st.failures += 1
        st.known = True
        st.last_failure, st.last_error = now, error
        if hold is not None:  # put aside: not before the hold ends, however it was before
            st.due = max(st.due, now + hold)
        else:
            st.due = now + backoff(st.failures, self.rand, self.first, self.cap)
        return st.due - now

    def due(self) -> list[str]:
        """Peers whose probe is due now."""
        now = self.clock()
        return [name for name, st in self._peers.items() if st.due <= now]

    def next_due(self) -> float | None:
        return min((st.due for st in self._peers.values()), default=None)

    def counts(self) -> tuple[int, int]:
        """(up, down) among the peers probed so far."""
        up = sum(1 for st in self._peers.values() if st.up)
        down = sum(1 for st in self._peers.values() if st.known and not st.up)
        return up, down

    def to_json(self, name: str) -> dict[str, Any]:
        st = self.state(name)
        now = self.clock()
        return {
            "state": "up" if st.up else ("down" if st.known else "unknown"),
            "failures": st.failures,
            "next_probe_in": max(0.0, st.due - now),
            "ok_ago": None if st.last_ok is None else now - st.last_ok,
            "failure_ago": None if st.last_failure is None else now - st.last_failure,
            "last_error": st.last_error or None,
        }
