"""Every Prometheus metric regproxy exports, on one registry of its own. Each is in README.md."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY: Final = CollectorRegistry(auto_describe=True)

REQUESTS: Final = Counter(
    "regproxy_http_requests_total",
    "HTTP requests answered, by route, method and status",
    ["route", "method", "status"],
    registry=REGISTRY,
)
REQUEST_SECONDS: Final = Histogram(
    "regproxy_http_request_duration_seconds",
    "Time to answer an HTTP request (until the handler returned), by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
CACHE: Final = Counter(
    "regproxy_cache_requests_total",
    "Content lookups by kind (blob, manifest), result (hit, miss, stale) and upstream host",
    ["kind", "result", "upstream"],
    registry=REGISTRY,
)
SERVED_BYTES: Final = Counter(
    "regproxy_served_bytes_total",
    "Bytes sent to clients, by kind and source (disk, upstream, peer)",
    ["kind", "source"],
    registry=REGISTRY,
)
FETCHED_BYTES: Final = Counter(
    "regproxy_fetched_bytes_total",
    "Bytes fetched from upstreams (and their mirrors), by source host; peers are "
    "regproxy_peer_fetched_bytes_total",
    ["source"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS: Final = Counter(
    "regproxy_upstream_errors_total",
    "Failed upstream or peer requests, by source and kind "
    "(timeout, connect, digest_mismatch, 4xx, 5xx, auth, error)",
    ["source", "kind"],
    registry=REGISTRY,
)
UPSTREAM_SECONDS: Final = Histogram(
    "regproxy_upstream_request_duration_seconds",
    "Upstream request latency until the response headers arrived, by source",
    ["source"],
    registry=REGISTRY,
)
STALE_SERVED: Final = Counter(
    "regproxy_stale_tags_served_total",
    "Tags served from the store because the upstream could not confirm them",
    ["upstream"],
    registry=REGISTRY,
)
UPSTREAM_QUEUE: Final = Gauge(
    "regproxy_upstream_queue_length",
    "Requests waiting for one of an upstream's max_connections, by upstream",
    ["upstream"],
    registry=REGISTRY,
)
UPSTREAM_QUEUE_SECONDS: Final = Histogram(
    "regproxy_upstream_queue_wait_seconds",
    "Time a request waited for one of an upstream's max_connections, by upstream",
    ["upstream"],
    buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
UPSTREAM_RATELIMIT: Final = Gauge(
    "regproxy_upstream_ratelimit_remaining",
    "Pulls left by the upstream's own count (Docker Hub's ratelimit-remaining), by upstream",
    ["upstream"],
    registry=REGISTRY,
)
INFLIGHT_FETCHES: Final = Gauge(
    "regproxy_inflight_fetches", "Upstream blob transfers in progress", registry=REGISTRY
)
INFLIGHT_WAITERS: Final = Gauge(
    "regproxy_inflight_waiters",
    "Client responses being served from in-progress transfers",
    registry=REGISTRY,
)
UPLOADS_IN_PROGRESS: Final = Gauge(
    "regproxy_uploads_in_progress", "Blob upload sessions open", registry=REGISTRY
)
STORE_BYTES: Final = Gauge(
    "regproxy_store_bytes", "Bytes of blobs and manifests in the store", registry=REGISTRY
)
PINNED_BYTES: Final = Gauge(
    "regproxy_pinned_bytes", "Bytes of content that eviction may not remove", registry=REGISTRY
)
EVICTED_BYTES: Final = Counter(
    "regproxy_evicted_bytes_total", "Bytes removed by eviction", registry=REGISTRY
)
STORE_LIMIT_BYTES: Final = Gauge(
    "regproxy_store_limit_bytes",
    "storage.max_size in bytes (a percentage resolved on the store's filesystem); 0: no limit",
    registry=REGISTRY,
)
STORE_FS_FREE_BYTES: Final = Gauge(
    "regproxy_store_filesystem_free_bytes",
    "Free bytes on the store's filesystem at the last eviction check",
    registry=REGISTRY,
)
EVICT_SHORT_BYTES: Final = Gauge(
    "regproxy_evict_short_bytes",
    "Bytes still over storage.max_size (or under storage.min_free) after the last eviction "
    "check, because nothing more was evictable (pinned, in use); 0 when within the limits",
    registry=REGISTRY,
)
READY: Final = Gauge(
    "regproxy_ready",
    "1 when the store takes writes, the index answers and the listener is up (checked on "
    "every /readyz and every 30s), else 0",
    registry=REGISTRY,
)
PEER_REQUESTS: Final = Counter(
    "regproxy_peer_requests_total",
    "Requests to the cluster's peers, by peer and result (hit, miss, error)",
    ["peer", "result"],
    registry=REGISTRY,
)
PEER_SERVED: Final = Counter(
    "regproxy_peer_served_requests_total",
    "Requests this host answered for its peers, by kind (lookup: from the local store only; "
    "fetch: as the home host, which may fetch from its upstream)",
    ["kind"],
    registry=REGISTRY,
)
PEER_SERVED_BYTES: Final = Counter(
    "regproxy_peer_served_bytes_total",
    "Body bytes this host answered to each peer of its list (requests from elsewhere that carry "
    "the peer marker are not counted here)",
    ["peer"],
    registry=REGISTRY,
)
PEER_FETCHED_BYTES: Final = Counter(
    "regproxy_peer_fetched_bytes_total",
    "Blob bytes fetched from the cluster's peers, by peer",
    ["peer"],
    registry=REGISTRY,
)
PEER_SECONDS: Final = Histogram(
    "regproxy_peer_request_duration_seconds",
    "Peer request latency until the response headers arrived, by peer",
    ["peer"],
    registry=REGISTRY,
)
PEER_ERRORS: Final = Counter(
    "regproxy_peer_errors_total",
    "Failed requests to peers, by peer and kind (timeout, slow, connect, digest_mismatch, "
    "4xx, 5xx, auth, error)",
    ["peer", "kind"],
    registry=REGISTRY,
)
PEERS: Final = Gauge(
    "regproxy_peers",
    "The cluster's other hosts by state (up; down: set aside until a probe finds them back)",
    ["state"],
    registry=REGISTRY,
)
LOGIN_FAILURES: Final = Counter(
    "regproxy_login_failures_total", "Refused logins (registry and web page)", registry=REGISTRY
)
LOGIN_THROTTLED: Final = Counter(
    "regproxy_login_throttled_total",
    "Logins answered 429 without a password check, by reason (budget: the client's refused "
    "logins per minute are spent; busy: too many checks queued)",
    ["reason"],
    registry=REGISTRY,
)

PREFETCH_IMAGES: Final = Gauge(
    "regproxy_prefetch_images",
    "Images of prefetch.images by state (done: last attempt succeeded, failed, pending: not tried yet)",
    ["state"],
    registry=REGISTRY,
)
PREFETCH_BYTES: Final = Counter(
    "regproxy_prefetch_bytes_total",
    "Blob bytes prefetch had to fetch (what was already in the store is not counted)",
    registry=REGISTRY,
)
PREFETCH_FAILURES: Final = Counter(
    "regproxy_prefetch_failures_total",
    "Failed attempts to prefetch an image (each retry counts)",
    registry=REGISTRY,
)
POLICY_DECISIONS: Final = Counter(
    "regproxy_policy_decisions_total",
    "Signature policy answers for manifests under a rule that requires a signature, by rule "
    "(its match) and result (allowed, denied)",
    ["rule", "result"],
    registry=REGISTRY,
)
CONNECTIONS_OPEN: Final = Gauge(
    "regproxy_http_connections", "Client connections open (admitted)", registry=REGISTRY
)
CONNECTIONS_SHED: Final = Counter(
    "regproxy_http_connections_shed_total",
    "Connections answered 503 and closed because http.max_connections were open",
    registry=REGISTRY,
)
SLOW_CLIENTS_CUT: Final = Counter(
    "regproxy_http_slow_clients_cut_total",
    "Connections closed for making no progress, by phase (header: request headers not in within "
    "http.header_timeout; read: a request body stalled for http.read_timeout; write: a response "
    "the client took nothing of for http.write_timeout)",
    ["phase"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class SourceMeters:
    """Where one kind of source (upstreams, peers) counts its requests: peer traffic is never
    counted as upstream traffic."""

    kind: str  # "upstream" | "peer"
    seconds: Histogram
    errors: Counter
    fetched: Counter
    queue: Gauge | None = None
    queue_seconds: Histogram | None = None


UPSTREAM_METERS: Final = SourceMeters(
    "upstream",
    UPSTREAM_SECONDS,
    UPSTREAM_ERRORS,
    FETCHED_BYTES,
    UPSTREAM_QUEUE,
    UPSTREAM_QUEUE_SECONDS,
)
PEER_METERS: Final = SourceMeters("peer", PEER_SECONDS, PEER_ERRORS, PEER_FETCHED_BYTES)


def meters_for(kind: str) -> SourceMeters:
    """The meters of a transfer source kind ("upstream", "peer", "home")."""
    return UPSTREAM_METERS if kind == "upstream" else PEER_METERS


#: metrics with a label naming an upstream host: (metric, its label names, that label)
_BY_UPSTREAM: Final[tuple[tuple[Any, tuple[str, ...], str], ...]] = (
    (CACHE, ("kind", "result", "upstream"), "upstream"),
    (FETCHED_BYTES, ("source",), "source"),
    (UPSTREAM_ERRORS, ("source", "kind"), "source"),
    (UPSTREAM_SECONDS, ("source",), "source"),
    (STALE_SERVED, ("upstream",), "upstream"),
    (UPSTREAM_QUEUE, ("upstream",), "upstream"),
    (UPSTREAM_QUEUE_SECONDS, ("upstream",), "upstream"),
    (UPSTREAM_RATELIMIT, ("upstream",), "upstream"),
)


def forget_upstream(host: str) -> None:
    """Drop every label set naming ``host`` (a ``"*"`` host whose client was dropped), so the
    hosts anonymous clients name cannot grow the metrics without bound."""
    for metric, names, key in _BY_UPSTREAM:
        combos = {
            tuple(sample.labels[n] for n in names)
            for family in metric.collect()
            for sample in family.samples
            if sample.labels.get(key) == host and all(n in sample.labels for n in names)
        }
        for combo in combos:
            with contextlib.suppress(KeyError):
                metric.remove(*combo)


def render() -> bytes:
    return generate_latest(REGISTRY)
