"""/metrics after a known sequence of hits, misses and a stale tag; the access log says the same."""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.images import make_image
from tests.peers import http, push_image

pytestmark = pytest.mark.peers

SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, body = http("GET", f"{url}/metrics")
    assert status == 200
    out = {}
    for line in body.decode().splitlines():
        m = SAMPLE.match(line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_after_hits_misses_and_a_stale_tag(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    up = registry_factory()
    img = make_image("amd64", layer_sizes=(100_000,))
    push_image(img, tmp_path / "layout", f"{up.hostport}/team/app:v1")
    proxy = daemon_factory(
        {
            "upstreams": {
                up.hostport: {"url": up.url, "alias": "up.test", "connect_timeout": "1s"}
            },
            # every request re-checks the tag: a HEAD that finds it unchanged is a hit, and
            # once the upstream is gone the next request is stale (no waiting for a TTL)
            "tag_ttl": "0s",
        }
    )
    host = up.hostport
    layer = img.layers[0]
    layer_digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    base = f"{proxy.url}/v2/up.test/team/app"

    # manifest: miss, then hit (confirmed unchanged upstream)
    for _ in range(2):
        status, _, body = http("GET", f"{base}/manifests/v1")
        assert status == 200 and body == img.manifest
    # layer: miss (pulled through), then two hits
    for _ in range(3):
        status, _, body = http("GET", f"{base}/blobs/{layer_digest}")
        assert status == 200 and body == layer
    # unknown blob: a miss that upstream answers 404
    missing = "sha256:" + "0" * 64
    assert http("GET", f"{base}/blobs/{missing}")[0] == 404

    m = scrape(proxy.url)
    assert (
        value(m, "regproxy_cache_requests_total", kind="manifest", result="miss", upstream=host)
        == 1
    )
    assert (
        value(m, "regproxy_cache_requests_total", kind="manifest", result="hit", upstream=host) == 1
    )
    assert value(m, "regproxy_cache_requests_total", kind="blob", result="miss", upstream=host) == 2
    assert value(m, "regproxy_cache_requests_total", kind="blob", result="hit", upstream=host) == 2
    assert value(m, "regproxy_fetched_bytes_total", source=host) == len(layer)
    assert value(m, "regproxy_served_bytes_total", kind="blob", source="upstream") == len(layer)
    assert value(m, "regproxy_served_bytes_total", kind="blob", source="disk") == 2 * len(layer)
    assert value(m, "regproxy_served_bytes_total", kind="manifest", source="disk") == 2 * len(
        img.manifest
    )
    assert value(m, "regproxy_http_requests_total", route="blob", method="GET", status="200") == 3
    assert value(m, "regproxy_http_requests_total", route="blob", method="GET", status="404") == 1
    assert value(m, "regproxy_inflight_fetches") == 0
    assert value(m, "regproxy_inflight_waiters") == 0
    assert value(m, "regproxy_stale_tags_served_total", upstream=host) == 0

    # the upstream goes away: the tag is served stale, and the failure is counted
    up.stop()
    status, _, body = http("GET", f"{base}/manifests/v1")
    assert status == 200 and body == img.manifest
    m = scrape(proxy.url)
    assert value(m, "regproxy_stale_tags_served_total", upstream=host) == 1
    assert (
        value(m, "regproxy_cache_requests_total", kind="manifest", result="stale", upstream=host)
        == 1
    )
    errors = sum(
        v
        for (name, labels), v in m.items()
        if name == "regproxy_upstream_errors_total" and ("source", host) in labels
    )
    assert errors >= 1

    # one access-log line per request, naming the cache result and the upstream (they are
    # written by the log's writer thread a moment after the answer: regproxy.log.LineHandler)
    def team_lines() -> list[str]:
        log = proxy.log()
        return [ln for ln in log.splitlines() if "regproxy.access" in ln and "/team/app/" in ln]

    deadline = time.monotonic() + 10
    while len(lines := team_lines()) < 7 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(lines) == 7
    log = proxy.log()
    assert sum("cache=miss" in line and f"upstream={host}" in line for line in lines) == 3
    assert sum("cache=hit" in line for line in lines) == 3
    assert sum("cache=stale" in line for line in lines) == 1
    assert re.search(rf"fetch.committed digest={layer_digest} .*source=", log)
    # upstream down: a blob nobody has cannot be called unknown, it is an upstream failure
    status, _, body = http("GET", f"{base}/blobs/{missing}")
    assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNKNOWN"
