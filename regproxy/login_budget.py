"""A per-client budget of failed logins: so many per minute per client address, then a wait.

The 1 s delay on a wrong password slows one guesser, not three hundred in parallel; this budget
is per client. A *client* is its IPv4 address, or the /64 of its IPv6 address (one host commonly
holds a whole /64). Each client may have at most ``per_minute`` refused logins in any 60 s
window, counting the password checks it has running: so a client that opens 300 connections at
once gets ``per_minute`` guesses checked and the rest refused at once, not 300 bcrypt runs.

The state is bounded: at most :data:`MAX_CLIENTS` clients are tracked, least recently seen
dropped first (a client dropped for being quiet had nothing left to wait for, or little). Time
comes from an injected clock. Nothing here knows HTTP, bcrypt or users.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

WINDOW: Final = 60.0
MAX_CLIENTS: Final = 10_000


def client_key(remote: str | None) -> str:
    """The client a remote address counts as: the IPv4 address, or the IPv6 /64."""
    if not remote:
        return "-"
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]  # not an address (a unix socket): counted as it is
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class _Client:
    failures: deque[float] = field(default_factory=deque)
    pending: int = 0


class LoginBudget:
    """Refused logins per client per :data:`WINDOW`; ``per_minute=0`` turns the budget off."""

    def __init__(
        self,
        per_minute: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._max_clients = max_clients
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def _get(self, client: str) -> _Client:
        state = self._clients.get(client)
        if state is None:
            state = self._clients[client] = _Client()
            while len(self._clients) > self._max_clients:
                # the least recently seen client without a check in flight (few ever have one)
                quiet = next((k for k, c in self._clients.items() if not c.pending), None)
                if quiet is None:
                    break
                del self._clients[quiet]
        self._clients.move_to_end(client)
        horizon = self._clock() - WINDOW
        while state.failures and state.failures[0] <= horizon:
            state.failures.popleft()
        return state

    def _wait(self, state: _Client) -> int:
        if len(state.failures) >= self.per_minute:
            return max(1, math.ceil(state.failures[0] + WINDOW - self._clock()))
        return 1  # only checks in flight fill the budget: they end within a second or so

    def spent(self, client: str) -> int | None:
        """Seconds until this client may try again, when its refused logins fill the budget."""
        if self.per_minute <= 0:
            return None
        state = self._get(client)
        return self._wait(state) if len(state.failures) >= self.per_minute else None

    def admit(self, client: str) -> int | None:
        """Start a password check for this client: None (admitted, now pending), or the seconds
        to wait when its refusals and the checks it has running fill the budget."""
        if self.per_minute <= 0:
            return None
        state = self._get(client)
        if len(state.failures) + state.pending >= self.per_minute:
            return self._wait(state)
        state.pending += 1
        return None

    def finish(self, client: str, *, failed: bool) -> None:
        """An admitted check ended; a failed one counts against the client for WINDOW."""
        if self.per_minute <= 0:
            return
        state = self._get(client)
        state.pending = max(0, state.pending - 1)
        if failed:
            state.failures.append(self._clock())
            while len(state.failures) > self.per_minute:
                state.failures.popleft()

    def refused(self, client: str) -> None:
        """A refusal that needed no check (a password too long to be anybody's)."""
        if self.per_minute <= 0:
            return
        state = self._get(client)
        state.pending += 1
        self.finish(client, failed=True)
