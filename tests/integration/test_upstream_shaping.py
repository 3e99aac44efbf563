"""Upstream shaping (issue 13): a request rate, Retry-After honoured, Docker Hub's rate limit.

The upstream is the tests' own fault server (tests/fakes.py) on port 0; regproxy runs in process.
Time is injected where a wait matters: nothing here sleeps for it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import UpstreamConfig, config_from_dict
from regproxy.deadline import Timing
from regproxy.errors import UpstreamError
from regproxy.upstream import UpstreamClient
from regproxy.web_keys import METRICS_KEY
from tests.fakes import FakeUpstream, digest_of

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
ALIAS = "fake.test"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class FakeTime:
    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def timing(self) -> Timing:
        return Timing(now=lambda: self.now, sleep=self.sleep, random=lambda: 0.5)


def client_for(up: FakeUpstream, time: FakeTime, **settings: Any) -> UpstreamClient:
    config = UpstreamConfig(up.hostport, url=up.url, **settings)
    return UpstreamClient(up.hostport, config, timing=time.timing())


def manifest(config: bytes) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()


@contextlib.asynccontextmanager
async def proxy(
    root: Path, up: FakeUpstream, **settings: Any
) -> AsyncIterator[TestClient[Any, Any]]:
    raw: dict[str, Any] = {
        "storage": {"root": str(root)},
        "log": {"access": False},
        "tag_ttl": "0s",
        "upstreams": {up.hostport: {"url": up.url, "alias": ALIAS, **settings}},
    }
    client: TestClient[Any, Any] = TestClient(
        TestServer(create_app(config_from_dict(raw)), host="127.0.0.1")
    )
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def test_retry_after_holds_the_upstream_until_it_passes(upstream: FakeUpstream) -> None:
    upstream.add_manifest("app", "v1", manifest(b"{}"), OCI_MANIFEST)
    upstream.manifest_status = 429
    upstream.manifest_headers = {"Retry-After": "5"}
    time = FakeTime()
    client = client_for(upstream, time)
    try:
        with pytest.raises(UpstreamError) as info:
            await client.head_manifest("app", "v1")
        assert info.value.kind == "429"
        assert upstream.count("HEAD", "/manifests/v1") == 1
        upstream.manifest_status = None  # the upstream is fine again, but asked us to wait
        upstream.manifest_headers = {}
        for step in (0.0, 2.0, 2.9):
            time.now += step
            with pytest.raises(UpstreamError) as info:
                await client.get_manifest("app", "v1")
            assert info.value.kind == "held"
        assert upstream.count("", "/manifests/v1") == 1  # not asked again within the 5 s
        time.now += 0.2  # 5.1 s after the 429
        assert await client.head_manifest("app", "v1") is not None
        assert upstream.count("HEAD", "/manifests/v1") == 2
    finally:
        await client.close()


async def test_stale_tags_are_served_while_the_upstream_is_held(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    v1 = manifest(b'{"v":1}')
    upstream.add_manifest("app", "latest", v1, OCI_MANIFEST)
    async with proxy(tmp_path / "store", upstream) as client:
        resp = await client.get(f"/v2/{ALIAS}/app/manifests/latest")
        assert resp.status == 200 and await resp.read() == v1
        upstream.manifest_status = 503
        upstream.manifest_headers = {"Retry-After": "3600"}
        asked = upstream.count("", "/manifests/latest")
        for _ in range(3):
            resp = await client.get(f"/v2/{ALIAS}/app/manifests/latest")
            assert resp.status == 200 and await resp.read() == v1
        assert upstream.count("", "/manifests/latest") == asked + 1  # the 503, then nothing


async def test_requests_per_second_are_spaced_in_queue_order(upstream: FakeUpstream) -> None:
    upstream.add_manifest("app", "v1", manifest(b"{}"), OCI_MANIFEST)
    time = FakeTime()
    client = client_for(upstream, time, max_requests_per_second=2.0)
    try:
        for _ in range(4):
            assert await client.head_manifest("app", "v1") is not None
    finally:
        await client.close()
    assert time.slept == [0.5, 0.5, 0.5]
    assert upstream.count("HEAD", "/manifests/v1") == 4


async def test_rate_limit_headers_make_tags_stale_before_the_reserve_is_spent(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    v1, v2 = manifest(b'{"v":1}'), manifest(b'{"v":2}')
    upstream.add_manifest("app", "latest", v1, OCI_MANIFEST)
    upstream.manifest_headers = {
        "ratelimit-limit": "100;w=21600",
        "ratelimit-remaining": "5;w=21600",
        "docker-ratelimit-source": "203.0.113.7",
    }
    async with proxy(tmp_path / "store", upstream, ratelimit_reserve=10) as client:
        resp = await client.get(f"/v2/{ALIAS}/app/manifests/latest")
        assert await resp.read() == v1  # a miss may spend the reserve: nothing else to serve
        remaining = client.server.app[METRICS_KEY].registry.get_sample_value(
            "regproxy_upstream_ratelimit_remaining", {"upstream": upstream.hostport}
        )
        assert remaining == 5
        upstream.add_manifest("app", "latest", v2, OCI_MANIFEST)  # the tag moves upstream
        gets = upstream.count("GET", "/manifests/latest")
        resp = await client.get(f"/v2/{ALIAS}/app/manifests/latest")
        assert resp.status == 200 and await resp.read() == v1  # stale: no GET below the reserve
        assert upstream.count("GET", "/manifests/latest") == gets
        assert upstream.count("HEAD", "/manifests/latest") >= 1  # HEADs are not pulls
        upstream.manifest_headers["ratelimit-remaining"] = "50;w=21600"
        resp = await client.get(f"/v2/{ALIAS}/app/manifests/latest")
        assert await resp.read() == v2
        assert upstream.count("GET", "/manifests/latest") == gets + 1
