"""Metrics per app: a fresh registry starts at zero, and each event is counted in the exported
metric and kept in the plain counts the web page and health read (never the metrics back)."""

from __future__ import annotations

from regproxy.metrics import Metrics


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_two_apps_never_count_into_each_other() -> None:
    a, b = Metrics(), Metrics()
    a.lookup("blob", "hit", "docker.io")
    assert (
        sample(a, "regproxy_cache_requests_total", kind="blob", result="hit", upstream="docker.io")
        == 1
    )
    assert (
        sample(b, "regproxy_cache_requests_total", kind="blob", result="hit", upstream="docker.io")
        is None
    )
    assert a.counts.lookups["hit"] == 1 and b.counts.lookups["hit"] == 0
    assert b"regproxy_cache_requests_total" in a.render()


def test_events_are_exported_and_kept() -> None:
    m = Metrics()
    m.served("blob", "disk", 100)
    m.served("blob", "peer", 7)
    m.stale("docker.io")
    m.peer_request("http://10.0.0.2:30003", "miss")
    m.served_peer("lookup")
    m.login_failed()
    m.evicted(4096)
    m.short(10)
    assert sample(m, "regproxy_served_bytes_total", kind="blob", source="disk") == 100
    assert m.counts.served == {"disk": 100, "peer": 7}
    assert m.counts.stale_served == 1 and m.counts.peer_served == 1
    assert m.counts.peer_requests[("http://10.0.0.2:30003", "miss")] == 1
    assert m.counts.login_failures == 1 and sample(m, "regproxy_login_failures_total") == 1
    assert m.counts.evicted_bytes == 4096 and m.counts.evict_short == 10
    assert sample(m, "regproxy_evict_short_bytes") == 10


def test_source_meters_keep_upstream_and_peer_apart() -> None:
    m = Metrics()
    add = m.upstream_meters.fetched_from("docker.io")
    add(10)
    add(5)
    m.peer_meters.fetched_from("http://p:30003")(3)
    m.upstream_meters.answered("docker.io", 0.01)
    m.upstream_meters.failed("docker.io", "connect")
    m.peer_meters.failed("http://p:30003", "timeout")
    assert m.counts.fetched == {("upstream", "docker.io"): 15, ("peer", "http://p:30003"): 3}
    assert sample(m, "regproxy_fetched_bytes_total", source="docker.io") == 15
    assert m.counts.answered[("upstream", "docker.io")] == 1
    assert m.counts.failed[("upstream", "docker.io")]["connect"] == 1
    assert m.counts.failed[("peer", "http://p:30003")]["timeout"] == 1
    assert sample(m, "regproxy_upstream_errors_total", source="docker.io", kind="connect") == 1


def test_forget_upstream_drops_its_label_sets() -> None:
    m = Metrics()
    m.lookup("blob", "miss", "h.example")
    m.upstream_meters.failed("h.example", "connect")
    m.forget_upstream("h.example")
    assert (
        sample(m, "regproxy_cache_requests_total", kind="blob", result="miss", upstream="h.example")
        is None
    )
    assert sample(m, "regproxy_upstream_errors_total", source="h.example", kind="connect") is None
