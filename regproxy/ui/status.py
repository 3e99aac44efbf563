"""The overview's one verdict and its peers panel.

The verdict reads what ``/readyz`` checks (store writable, index open, listener; prefetch when
``prefetch.required_for_ready``), then what an operator would be paged for: an upstream or peer
that stopped answering, tags served stale, prefetch failures, a full store with nothing left to
evict. Everything comes from state the daemon keeps anyway (health, peers, prefetcher, metrics):
the page dials nothing.
"""

from __future__ import annotations

import time
from typing import Any, Final

from regproxy import __version__
from regproxy.ui.base import UI

#: a peer's liveness (regproxy.liveness) as the page says it
_PEER_STATES: Final = {"up": "reachable", "down": "unreachable", "unknown": "unknown"}
#: tags served stale this recently make the verdict "degraded"
STALE_RECENT_SECONDS: Final = 3600.0


def peer_urls(registry: Any) -> set[str]:
    peers = getattr(registry, "peers", None)
    return {p.url for p in peers.known()} if peers is not None else set()


def peers_data(registry: Any) -> list[dict[str, Any]]:
    """Each peer of the list: reachable or not, what it sent and was sent, and was asked."""
    peers = getattr(registry, "peers", None)
    if peers is None:
        return []
    tally = registry.metrics.counts  # what the daemon keeps, not read back from the metrics
    out = []
    for p in peers.known():
        live = peers.liveness.to_json(p.url)  # up, down (set aside until a probe), unknown
        state = _PEER_STATES[live["state"]] if not p.is_self else "this host"
        out.append(
            {
                "url": p.url,
                "state": state,
                "retry_in": live["next_probe_in"] if state == "unreachable" else None,
                "bytes_from": tally.fetched[("peer", p.url)],
                "bytes_to": peers.served.get(p.url, 0),  # answered to it (regproxy.peers)
                "hits": tally.peer_requests[(p.url, "hit")],
                "misses": tally.peer_requests[(p.url, "miss")],
                "errors": tally.peer_requests[(p.url, "error")],
            }
        )
    return out


def stale_recent(registry: Any, now: float) -> int:
    stale = getattr(registry, "stale_served", None) or {}
    return sum(1 for t in stale.values() if t > now - STALE_RECENT_SECONDS)


async def health_data(
    ui: UI, registry: Any, upstreams: list[dict[str, Any]], peers: list[dict[str, Any]]
) -> dict[str, Any]:
    now = time.time()
    extra: dict[str, bool] = {}
    prefetch = ui.prefetch
    if prefetch is not None and ui.config.prefetch.required_for_ready:
        extra["prefetch_done"] = prefetch.prefetch_done
    _status, ready = await ui.health.check(extra)
    images = sorted((prefetch.state if prefetch is not None else {}).items())
    prefetch_counts = {
        s: sum(1 for _, v in images if v == s) for s in ("done", "pending", "failed")
    }
    problems: list[str] = []
    for name, err in ready.get("errors", {}).items():
        problems.append(f"{name}: {err}")
    for name, ok in ready["checks"].items():
        if not ok and name not in ready.get("errors", {}):
            problems.append(f"{name}: not yet" if name == "prefetch_done" else name)
    warnings: list[str] = []
    if ui.config.sync_enable:
        for u in upstreams:
            for s in u["sources"]:
                if s["state"] == "unreachable":
                    warnings.append(f"upstream {s['source']} is not answering")
                limit = s.get("ratelimit") or {}
                if limit.get("below_reserve"):
                    warnings.append(
                        f"upstream {s['source']}: {limit['remaining']} pulls left, below the "
                        f"reserve of {limit['reserve']}: tags that moved are served stale"
                    )
    for p in peers:
        if p["state"] == "unreachable":
            warnings.append(f"peer {p['url']} is not answering")
    stale = stale_recent(registry, now)
    if stale:
        warnings.append(
            f"{stale} tag(s) served stale in the last hour: the upstream could not confirm them"
        )
    if prefetch_counts["failed"]:
        warnings.append(f"{prefetch_counts['failed']} prefetch image(s) failed")
    tally = registry.metrics.counts
    short = tally.evict_short
    if short:
        warnings.append("the store is over its limit with nothing left to evict (pinned or in use)")
    verdict = "not ready" if not ready["ready"] else ("degraded" if warnings else "healthy")
    return {
        "verdict": verdict,
        "ready": ready["ready"],
        "checks": ready["checks"],
        "problems": problems,
        "warnings": warnings,
        "version": __version__,
        "instance": ui.instance,
        "started": ui.started,
        "uptime": max(0.0, now - ui.started),
        "evicted_bytes": tally.evicted_bytes,
        "evict_short_bytes": short,
        "login_failures": tally.login_failures,
        "stale_tags_served": tally.stale_served,
        "peer_requests_served": tally.peer_served,
        "prefetch": {
            "counts": prefetch_counts,
            "images": [{"image": ref, "state": state} for ref, state in images],
        },
    }
