"""The counters the overview charts, sampled every :data:`SAMPLE_SECONDS` for 24 hours."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Final

from regproxy.metrics import Metrics

#: the overview's chart: one sample of the counters every 10 minutes, for 24 hours
SAMPLE_SECONDS: Final = 600.0
SAMPLES: Final = 144


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    hits: float
    misses: float
    served_disk: float
    served_remote: float  # from upstream transfers and peers, as they arrived
    fetched: float


def sample_now(metrics: Metrics, now: float | None = None) -> Sample:
    """The running totals now, from the counts the daemon keeps (not read from the metrics)."""
    counts = metrics.counts
    return Sample(
        t=time.time() if now is None else now,
        hits=counts.lookups["hit"],
        misses=counts.lookups["miss"] + counts.lookups["stale"],
        served_disk=counts.served["disk"],
        served_remote=counts.served["upstream"] + counts.served["peer"],
        # the chart's "fetched": from upstreams and from peers
        fetched=sum(counts.fetched.values()),
    )


class History:
    """A ring of counter samples, one per :data:`SAMPLE_SECONDS`, for the overview's chart."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.samples: deque[Sample] = deque(maxlen=SAMPLES + 1)
        self.samples.append(sample_now(self.metrics))

    def record(self) -> None:
        self.samples.append(sample_now(self.metrics))

    def intervals(self) -> list[dict[str, float]]:
        """Per interval (the last one still open, up to now): bytes from disk and fetched."""
        points = [*self.samples, sample_now(self.metrics)]
        out = []
        for a, b in itertools.pairwise(points):
            out.append(
                {
                    "start": a.t,
                    "end": b.t,
                    "served_disk": max(0.0, b.served_disk - a.served_disk),
                    "fetched": max(0.0, b.fetched - a.fetched),
                    "hits": max(0.0, b.hits - a.hits),
                    "misses": max(0.0, b.misses - a.misses),
                }
            )
        return out[-SAMPLES:]

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.record()
