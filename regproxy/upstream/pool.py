"""One :class:`UpstreamClient` per upstream host, and a bound on how many.

Hosts come from clients' requests, and the ``"*"`` entry (or a pattern such as ``*.pkg.dev``)
matches any number of them: at most ``max_clients`` clients are kept, least recently used first
out. A client is only dropped when nothing is in flight on it (an open blob stream holds a
slot); with it go its session, its token caches and its metric label sets.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Final

from regproxy.config import Config
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.metrics import Metrics
from regproxy.upstream.client import UpstreamClient

log = logging.getLogger("regproxy.upstream")
MAX_CLIENTS: Final = 256
_CLOSING: set[asyncio.Task[Any]] = set()


class ClientPool:
    def __init__(
        self,
        config: Config,
        *,
        max_clients: int = MAX_CLIENTS,
        timing: Timing = DEFAULT_TIMING,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_clients = max_clients
        self.timing = timing
        self._clients: OrderedDict[str, UpstreamClient] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    def get(self, host: str) -> UpstreamClient | None:
        """The client for ``host``, or None when no upstream entry matches it."""
        client = self._clients.get(host)
        if client is not None:
            self._clients.move_to_end(host)
            return client
        entry = self.config.upstream_for(host)
        if entry is None:
            return None
        client = UpstreamClient(
            host,
            entry,
            public_only=entry.pattern == "*",
            timing=self.timing,
            meters=self.metrics.upstream_meters,
        )
        self._clients[host] = client
        self._trim()
        return client

    def clients(self) -> list[UpstreamClient]:
        return list(self._clients.values())

    def _trim(self) -> None:
        excess = len(self._clients) - self.max_clients
        for host in list(self._clients):
            if excess <= 0:
                return
            client = self._clients[host]
            slots = client.transport.slots
            if slots.in_use or slots.waiting:
                continue  # busy: it stays until a later trim finds it idle
            del self._clients[host]
            excess -= 1
            self.metrics.forget_upstream(host)
            log.info("upstream.client_dropped host=%s clients=%d", host, len(self._clients))
            try:
                task = asyncio.get_running_loop().create_task(client.close())
            except RuntimeError:  # no loop, so no session was ever opened
                continue
            _CLOSING.add(task)
            task.add_done_callback(_CLOSING.discard)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
