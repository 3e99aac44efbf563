"""Upstream clients per host are bounded, and so are the metric label sets hosts create."""

from __future__ import annotations

from regproxy.config import config_from_dict
from regproxy.metrics import Metrics
from regproxy.upstream.pool import ClientPool


def errors(metrics: Metrics, host: str) -> float | None:
    return metrics.registry.get_sample_value(
        "regproxy_upstream_errors_total", {"source": host, "kind": "connect"}
    )


async def test_clients_for_star_hosts_are_bounded_and_take_their_labels_along() -> None:
    config = config_from_dict({"upstreams": {"*": {}, "ghcr.io": {}}})
    metrics = Metrics()
    pool = ClientPool(config, max_clients=3, metrics=metrics)
    hosts = [f"h{i}.pool-test.example" for i in range(6)]
    for host in hosts:
        client = pool.get(host)
        assert client is not None and client.public_only
        metrics.upstream_errors.labels(host, "connect").inc()
        metrics.cache.labels("blob", "miss", host).inc()
    assert len(pool) == 3
    assert [c.name for c in pool.clients()] == hosts[3:]
    for host in hosts[:3]:
        assert errors(metrics, host) is None
        assert (
            metrics.registry.get_sample_value(
                "regproxy_cache_requests_total",
                {"kind": "blob", "result": "miss", "upstream": host},
            )
            is None
        )
    assert errors(metrics, hosts[-1]) == 1.0
    assert pool.get("not matched") is not None  # "*" matches any host
    await pool.close()
    assert len(pool) == 0


async def test_a_host_no_entry_matches_gets_no_client() -> None:
    pool = ClientPool(config_from_dict({"upstreams": {"ghcr.io": {}}}))
    assert pool.get("evil.example") is None
    assert len(pool) == 0
