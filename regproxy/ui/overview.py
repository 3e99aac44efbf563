"""The overview: the store, the cache's counters, the upstreams, the last 24 hours."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from regproxy.config_values import SizeLimit
from regproxy.ui import queries
from regproxy.ui.base import (
    json_response,
    registry_of,
    render,
    ui_of,
)
from regproxy.ui.charts import chart
from regproxy.ui.format import configured_size
from regproxy.ui.history import sample_now
from regproxy.ui.status import health_data, peer_urls, peers_data


# --- the overview ----------------------------------------------------------------------------------
def ratelimits(registry: Any) -> dict[str, dict[str, Any]]:
    """What each upstream and mirror last said of its pull limit (Docker Hub's headers), by
    source, as the upstream clients keep it: the page reads state, never the metrics."""
    pool = getattr(registry, "clients", None)
    out: dict[str, dict[str, Any]] = {}
    for client in pool.clients() if pool is not None else []:
        out.update(client.ratelimits())
    return out


def _limit_text(size: SizeLimit, resolved: int | None) -> str | None:
    """The limit as configured, in its units (``100 MB``, ``80% of the filesystem``)."""
    if not size or resolved is None:
        return None
    if size.fraction:
        return f"{size.fraction * 100:g}% of the filesystem"
    return configured_size(size.bytes)


async def overview_data(request: web.Request) -> dict[str, Any]:
    ui = ui_of(request)
    registry = registry_of(request)
    loop = asyncio.get_running_loop()
    now = time.time()
    total, free = await loop.run_in_executor(None, registry.store.disk_usage)
    counts = await registry.db.read(queries.totals)  # running totals: one row, no scan
    storage = ui.config.storage
    limit = storage.max_size.resolve(total) if storage.max_size else None
    floor = storage.min_free.resolve(total) if storage.min_free else 0
    s = sample_now(ui.metrics, now)
    lookups = s.hits + s.misses
    ui.health.upstreams.sample(now)
    peers = peer_urls(registry)
    seen = {k: v for k, v in ui.health.upstreams.to_json().items() if k not in peers}
    limits = ratelimits(registry)
    for src, st in seen.items():
        st["ratelimit"] = limits.get(src)
    upstreams = []
    matched: set[str] = set()
    for u in ui.config.upstreams:
        hosts = [
            {"source": src, **st}
            for src, st in seen.items()
            if u.matches(src) or src == u.alias or (u.url and src in u.url)
        ]
        matched.update(h["source"] for h in hosts)
        upstreams.append(
            {
                "pattern": u.pattern,
                "url": u.url or None,
                "alias": u.alias,
                "mirrors": list(u.mirrors),
                "sources": hosts,
            }
        )
    others = [{"source": src, **st} for src, st in seen.items() if src not in matched]
    tally = ui.metrics.counts
    fetched_peers = sum(n for (kind, _), n in tally.fetched.items() if kind == "peer")
    fetched_upstream = sum(n for (kind, _), n in tally.fetched.items() if kind == "upstream")
    fetcher = getattr(registry, "fetcher", None)
    peer_rows = peers_data(registry)
    intervals = ui.history.intervals()
    return {
        "time": now,
        "sync": ui.config.sync_enable,
        "project": ui.config.project,
        "health": await health_data(ui, registry, upstreams, peer_rows),
        "store": {
            "used": counts["store_bytes"],
            "limit": limit,
            "limit_configured": _limit_text(storage.max_size, limit),
            "min_free": floor,
            "filesystem": total,
            "free": free,
            "pinned": counts["pinned_bytes"],
            "unreferenced": counts["unreferenced_bytes"],
        },
        "counts": {k: counts[k] for k in ("repositories", "tags", "manifests", "blobs")},
        "cache": {
            "hits": s.hits,
            "misses": s.misses,
            "hit_ratio": (s.hits / lookups) if lookups else None,
            "served_from_disk": s.served_disk,
            "served_from_upstream": tally.served["upstream"],
            "served_from_peers": tally.served["peer"],
            "fetched_upstream": fetched_upstream,  # upstreams only
            "fetched_peers": fetched_peers,
            "inflight_fetches": len(fetcher.inflight) if fetcher is not None else 0,
        },
        "upstreams": upstreams,
        "other_sources": others,
        "peers": peer_rows,
        "history": intervals,
    }


async def overview(request: web.Request) -> web.Response:
    data = await overview_data(request)
    store = data["store"]
    used_of = store["limit"] or store["filesystem"] or 1
    return render(
        request,
        "overview.html",
        d=data,
        used_pct=min(100.0, 100.0 * store["used"] / used_of) if used_of else 0.0,
        chart=chart(data["history"], data["time"]),
        refresh=_refresh(request),
    )


def _refresh(request: web.Request) -> int:
    """``?refresh=N``: the page reloads itself every N seconds (10..3600; 0 or absent: never)."""
    try:
        n = int(request.query.get("refresh", "0"))
    except ValueError:
        return 0
    return 0 if n <= 0 else max(10, min(3600, n))


async def api_overview(request: web.Request) -> web.Response:
    return json_response(await overview_data(request))
