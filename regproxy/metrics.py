"""Every Prometheus metric regproxy exports (each is in README.md), made per app on a registry
handed in: nothing here is global."""

from __future__ import annotations

import contextlib
from collections import Counter as Tally
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

#: label sets :meth:`Metrics.child` remembers at most
MAX_CHILDREN: Final = 4096


@dataclass(slots=True)
class Counts:
    """The numbers the web page and the health checks show, kept as plain state by the same
    calls that count the metrics (below): nothing reads the metrics back as data."""

    #: content lookups by result (hit, miss, stale)
    lookups: Tally[str] = field(default_factory=Tally)
    #: bytes sent to clients by source (disk, upstream, peer)
    served: Tally[str] = field(default_factory=Tally)
    #: bytes fetched by (kind, source): ("upstream", host) or ("peer", url)
    fetched: Tally[tuple[str, str]] = field(default_factory=Tally)
    #: requests answered by (kind, source): ("upstream", an upstream or mirror), ("peer", url)
    answered: Tally[tuple[str, str]] = field(default_factory=Tally)
    #: failures by (kind, source), then by what failed (connect, timeout, auth, ...)
    failed: dict[tuple[str, str], Tally[str]] = field(default_factory=dict)
    #: requests to each peer by (peer, result): hit, miss, error
    peer_requests: Tally[tuple[str, str]] = field(default_factory=Tally)
    #: requests this host answered for peers
    peer_served: int = 0
    stale_served: int = 0
    login_failures: int = 0
    evicted_bytes: int = 0
    #: bytes over the limit that nothing evictable could free, at the last check
    evict_short: int = 0


@dataclass(frozen=True, slots=True)
class SourceMeters:
    """Where one kind of source (upstreams, peers) counts its requests: peer traffic is never
    counted as upstream traffic."""

    kind: str  # "upstream" | "peer"
    seconds: Histogram
    errors: Counter
    fetched: Counter
    counts: Counts
    queue: Gauge | None = None
    queue_seconds: Histogram | None = None
    ratelimit: Gauge | None = None

    def answered(self, source: str, seconds: float) -> None:
        """A request to the source was answered (any status) after ``seconds``."""
        self.seconds.labels(source).observe(seconds)
        self.counts.answered[(self.kind, source)] += 1

    def failed(self, source: str, kind: str) -> None:
        self.errors.labels(source, kind).inc()
        self.counts.failed.setdefault((self.kind, source), Tally())[kind] += 1

    def fetched_from(self, source: str) -> Callable[[int], None]:
        """What a transfer calls with each chunk's size, as it lands."""
        child = self.fetched.labels(source)
        tally, key = self.counts.fetched, (self.kind, source)

        def add(n: int) -> None:
            child.inc(n)
            tally[key] += n

        return add


class Metrics:
    """Every Prometheus metric regproxy exports, on the :class:`CollectorRegistry` handed in:
    one per app (``create_app(config, metrics=...)``), so two apps in one process (tests) never
    count into each other, and a test starts from zero with a fresh one."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        #: label sets looked up already (:meth:`child`)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "regproxy_http_requests_total",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "regproxy_http_request_duration_seconds",
            "Time to answer an HTTP request (until the handler returned), by route",
            ["route"],
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
            ),
            registry=r,
        )
        self.cache = Counter(
            "regproxy_cache_requests_total",
            "Content lookups by kind (blob, manifest), result (hit, miss, stale) and upstream host",
            ["kind", "result", "upstream"],
            registry=r,
        )
        self.served_bytes = Counter(
            "regproxy_served_bytes_total",
            "Bytes sent to clients, by kind and source (disk, upstream, peer)",
            ["kind", "source"],
            registry=r,
        )
        self.fetched_bytes = Counter(
            "regproxy_fetched_bytes_total",
            "Bytes fetched from upstreams (and their mirrors), by source host; peers are "
            "regproxy_peer_fetched_bytes_total",
            ["source"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "regproxy_upstream_errors_total",
            "Failed upstream or peer requests, by source and kind "
            "(timeout, connect, digest_mismatch, 4xx, 5xx, auth, error)",
            ["source", "kind"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "regproxy_upstream_request_duration_seconds",
            "Upstream request latency until the response headers arrived, by source",
            ["source"],
            registry=r,
        )
        self.stale_served = Counter(
            "regproxy_stale_tags_served_total",
            "Tags served from the store because the upstream could not confirm them",
            ["upstream"],
            registry=r,
        )
        self.upstream_queue = Gauge(
            "regproxy_upstream_queue_length",
            "Requests waiting for one of an upstream's max_connections, by upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_queue_seconds = Histogram(
            "regproxy_upstream_queue_wait_seconds",
            "Time a request waited for one of an upstream's max_connections, by upstream",
            ["upstream"],
            buckets=(0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.upstream_ratelimit = Gauge(
            "regproxy_upstream_ratelimit_remaining",
            "Pulls left by the upstream's own count (Docker Hub's ratelimit-remaining), by upstream",
            ["upstream"],
            registry=r,
        )
        self.inflight_fetches = Gauge(
            "regproxy_inflight_fetches", "Upstream blob transfers in progress", registry=r
        )
        self.inflight_waiters = Gauge(
            "regproxy_inflight_waiters",
            "Client responses being served from in-progress transfers",
            registry=r,
        )
        self.uploads_in_progress = Gauge(
            "regproxy_uploads_in_progress", "Blob upload sessions open", registry=r
        )
        self.store_bytes = Gauge(
            "regproxy_store_bytes", "Bytes of blobs and manifests in the store", registry=r
        )
        self.pinned_bytes = Gauge(
            "regproxy_pinned_bytes", "Bytes of content that eviction may not remove", registry=r
        )
        self.evicted_bytes = Counter(
            "regproxy_evicted_bytes_total", "Bytes removed by eviction", registry=r
        )
        self.fetch_refused = Counter(
            "regproxy_fetch_refused_total",
            "Pull-through blob transfers refused with 507 before their first byte, by reason "
            "(no_space: no room under storage.max_size / above storage.min_free even after "
            "eviction; too_large: larger than the cache may ever hold)",
            ["reason"],
            registry=r,
        )
        self.fetch_store_errors = Counter(
            "regproxy_fetch_store_errors_total",
            "Pull-through blob transfers ended by this host's own disk (a write or the commit "
            "failed), by reason (no_space: ENOSPC/EDQUOT; io: any other error, e.g. EIO); no "
            "source is blamed for them",
            ["reason"],
            registry=r,
        )
        self.fetch_switches = Counter(
            "regproxy_fetch_switches_total",
            "Blob transfers that changed source part-way, by the kind of the source that failed "
            "(or that starts over: upstream, peer, home) and how: continued (the next source "
            "went on with a Range request; responses kept going), restarted (from byte 0; "
            "responses that had sent bytes were cut)",
            ["kind", "how"],
            registry=r,
        )
        self.upload_refused = Counter(
            "regproxy_upload_refused_total",
            "Pushed blob bodies (POST/PATCH/PUT) refused with 507 before the bytes that do not "
            "fit were written, by reason (no_space: no room above storage.min_free even after "
            "eviction; too_large: larger than the cache may ever hold)",
            ["reason"],
            registry=r,
        )
        self.import_refused = Counter(
            "regproxy_import_refused_total",
            "Bundle files (and bundles uploaded to /admin/import or the web page) the daemon "
            "refused with 507 before writing them, by reason (no_space: no room above "
            "storage.min_free even after eviction; too_large: larger than the cache may ever "
            "hold); the bundle is not imported",
            ["reason"],
            registry=r,
        )
        self.store_limit_bytes = Gauge(
            "regproxy_store_limit_bytes",
            "storage.max_size in bytes (a percentage resolved on the store's filesystem); 0: no limit",
            registry=r,
        )
        self.store_fs_free_bytes = Gauge(
            "regproxy_store_filesystem_free_bytes",
            "Free bytes on the store's filesystem at the last eviction check",
            registry=r,
        )
        self.evict_short_bytes = Gauge(
            "regproxy_evict_short_bytes",
            "Bytes still over storage.max_size (or under storage.min_free) after the last eviction "
            "check, because nothing more was evictable (pinned, in use); 0 when within the limits",
            registry=r,
        )
        self.ready = Gauge(
            "regproxy_ready",
            "1 when the store takes writes, the index answers and the listener is up (checked on "
            "every /readyz and every 30s), else 0",
            registry=r,
        )
        self.peer_requests = Counter(
            "regproxy_peer_requests_total",
            "Requests to the cluster's peers, by peer and result (hit, miss, error)",
            ["peer", "result"],
            registry=r,
        )
        self.peer_served = Counter(
            "regproxy_peer_served_requests_total",
            "Requests this host answered for its peers, by kind (lookup: from the local store only; "
            "fetch: as the home host, which may fetch from its upstream)",
            ["kind"],
            registry=r,
        )
        self.peer_served_bytes = Counter(
            "regproxy_peer_served_bytes_total",
            "Body bytes this host answered to each peer of its list (requests from elsewhere that carry "
            "the peer marker are not counted here)",
            ["peer"],
            registry=r,
        )
        self.peer_fetched_bytes = Counter(
            "regproxy_peer_fetched_bytes_total",
            "Blob bytes fetched from the cluster's peers, by peer",
            ["peer"],
            registry=r,
        )
        self.peer_seconds = Histogram(
            "regproxy_peer_request_duration_seconds",
            "Peer request latency until the response headers arrived, by peer",
            ["peer"],
            registry=r,
        )
        self.peer_errors = Counter(
            "regproxy_peer_errors_total",
            "Failed requests to peers, by peer and kind (timeout, slow, connect, digest_mismatch, "
            "4xx, 5xx, auth, error)",
            ["peer", "kind"],
            registry=r,
        )
        self.peers = Gauge(
            "regproxy_peers",
            "The cluster's other hosts by state (up; down: set aside until a probe finds them back)",
            ["state"],
            registry=r,
        )
        self.login_failures = Counter(
            "regproxy_login_failures_total", "Refused logins (registry and web page)", registry=r
        )
        self.login_throttled = Counter(
            "regproxy_login_throttled_total",
            "Logins answered 429 without a password check, by reason (budget: the client's refused "
            "logins per minute are spent; busy: too many checks queued)",
            ["reason"],
            registry=r,
        )
        self.prefetch_images = Gauge(
            "regproxy_prefetch_images",
            "Images of prefetch.images by state (done: last attempt succeeded, failed, pending: not tried yet)",
            ["state"],
            registry=r,
        )
        self.prefetch_bytes = Counter(
            "regproxy_prefetch_bytes_total",
            "Blob bytes prefetch had to fetch (what was already in the store is not counted)",
            registry=r,
        )
        self.prefetch_failures = Counter(
            "regproxy_prefetch_failures_total",
            "Failed attempts to prefetch an image (each retry counts)",
            registry=r,
        )
        self.policy_decisions = Counter(
            "regproxy_policy_decisions_total",
            "Signature policy answers for manifests under a rule that requires a signature, by rule "
            "(its match) and result (allowed, denied)",
            ["rule", "result"],
            registry=r,
        )
        self.connections_open = Gauge(
            "regproxy_http_connections", "Client connections open (admitted)", registry=r
        )
        self.connections_shed = Counter(
            "regproxy_http_connections_shed_total",
            "Connections answered 503 and closed because http.max_connections were open",
            registry=r,
        )
        self.fast_answers = Counter(
            "regproxy_http_fast_answers_total",
            "Requests answered from memory in front of aiohttp's parser (http.fast_path: cached "
            "manifest GETs and HEADs, small blob GETs); also counted in regproxy_http_requests_total",
            registry=r,
        )
        self.access_lines_dropped = Counter(
            "regproxy_access_lines_dropped_total",
            "Access lines dropped because stderr took nothing while 4 MiB of them waited "
            "(journald stalled); the loop never waits on stderr for an access line",
            registry=r,
        )
        self.slow_clients_cut = Counter(
            "regproxy_http_slow_clients_cut_total",
            "Connections closed for making no progress, by phase (header: request headers not in within "
            "http.header_timeout; read: a request body stalled for http.read_timeout; write: a response "
            "the client took nothing of for http.write_timeout)",
            ["phase"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "regproxy_tls_handshake_failures_total",
            "TLS handshakes that failed, by reason (protocol_version, certificate_rejected, "
            "no_shared_cipher, not_tls, timeout, closed, other; see regproxy.tls_failures)",
            ["reason"],
            registry=r,
        )
        #: the numbers the web page and health read (never the metrics themselves)
        self.counts = Counts()
        #: where transfers from upstreams and from peers count (never into each other)
        self.upstream_meters = SourceMeters(
            "upstream",
            self.upstream_seconds,
            self.upstream_errors,
            self.fetched_bytes,
            self.counts,
            self.upstream_queue,
            self.upstream_queue_seconds,
            self.upstream_ratelimit,
        )
        self.peer_meters = SourceMeters(
            "peer", self.peer_seconds, self.peer_errors, self.peer_fetched_bytes, self.counts
        )
        #: metrics with a label naming an upstream host: (metric, its label names, that label)
        self._by_upstream: tuple[tuple[Any, tuple[str, ...], str], ...] = (
            (self.cache, ("kind", "result", "upstream"), "upstream"),
            (self.fetched_bytes, ("source",), "source"),
            (self.upstream_errors, ("source", "kind"), "source"),
            (self.upstream_seconds, ("source",), "source"),
            (self.stale_served, ("upstream",), "upstream"),
            (self.upstream_queue, ("upstream",), "upstream"),
            (self.upstream_queue_seconds, ("upstream",), "upstream"),
            (self.upstream_ratelimit, ("upstream",), "upstream"),
        )

    # --- events: counted in the metrics and kept in ``counts`` --------------------------------
    def lookup(self, kind: str, result: str, upstream: str) -> None:
        """A content lookup: hit, miss or stale (``upstream`` labels the metric only)."""
        self.child(self.cache, kind, result, upstream).inc()
        self.counts.lookups[result] += 1

    def served(self, kind: str, source: str, n: int) -> None:
        """Bytes of a blob or manifest sent to a client, from disk, an upstream or a peer."""
        self.child(self.served_bytes, kind, source).inc(n)
        self.counts.served[source] += n

    def stale(self, upstream: str) -> None:
        self.stale_served.labels(upstream).inc()
        self.counts.stale_served += 1

    def peer_request(self, peer: str, result: str) -> None:
        """A request to a peer: hit, miss or error."""
        self.peer_requests.labels(peer, result).inc()
        self.counts.peer_requests[(peer, result)] += 1

    def served_peer(self, kind: str) -> None:
        """A request from a peer answered here (a lookup, or a fetch as its home host)."""
        self.peer_served.labels(kind).inc()
        self.counts.peer_served += 1

    def login_failed(self) -> None:
        self.login_failures.inc()
        self.counts.login_failures += 1

    def evicted(self, n: int) -> None:
        self.evicted_bytes.inc(n)
        self.counts.evicted_bytes += n

    def short(self, n: int) -> None:
        """Bytes over the limit nothing evictable could free (0 when none)."""
        self.evict_short_bytes.set(n)
        self.counts.evict_short = n

    def meters_for(self, kind: str) -> SourceMeters:
        """The meters of a transfer source kind ("upstream", "peer", "home")."""
        return self.upstream_meters if kind == "upstream" else self.peer_meters

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: ``labels()`` costs microseconds, more than
        the rest of a counter's update, on every request (bounded: label values are bounded,
        and what is remembered more so)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = metric.labels(*labels)
            if len(self._children) < MAX_CHILDREN:
                self._children[key] = found
        return found

    def forget_upstream(self, host: str) -> None:
        """Drop every label set naming ``host`` (a ``"*"`` host whose client was dropped), so the
        hosts anonymous clients name cannot grow the metrics without bound."""
        self._children.clear()  # a removed label set must not be counted on unseen
        for metric, names, key in self._by_upstream:
            combos = {
                tuple(sample.labels[n] for n in names)
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get(key) == host and all(n in sample.labels for n in names)
            }
            for combo in combos:
                with contextlib.suppress(KeyError):
                    metric.remove(*combo)

    def render(self) -> bytes:
        """The text exposition of this app's metrics (``/metrics``)."""
        return generate_latest(self.registry)
