"""Upstreams that misbehave on purpose: what they can and cannot make regproxy do.

regproxy runs in process (``create_app`` behind aiohttp's test server on 127.0.0.1); the upstream
is the tests' own fault server (tests/fakes.py) on port 0, where docker-registry cannot play the
fault. Nothing here sleeps to pass a deadline: deadlines are configured small, or the clock is
injected.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy import metrics
from regproxy.app import create_app
from regproxy.config import config_from_dict
from tests.fakes import FakeUpstream

# api keeps per-request facts under plain string keys (request["error"]), as test_auth says
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
ALIAS = "fake.test"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    up = await FakeUpstream().start()
    yield up
    await up.stop()


@pytest.fixture
async def canary() -> AsyncIterator[FakeUpstream]:
    """An internal service nobody may reach through regproxy: it counts TCP connections."""
    up = await FakeUpstream().start()
    yield up
    await up.stop()


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


def errors(source: str, kind: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "regproxy_upstream_errors_total", {"source": source, "kind": kind}
    )
    return value or 0.0


# --- the address guard ---------------------------------------------------------------------------
async def test_redirect_to_an_internal_address_is_never_dialled(
    tmp_path: Path, upstream: FakeUpstream, canary: FakeUpstream, caplog: Any
) -> None:
    data = os.urandom(200_000)
    d = canary.add_blob(data)
    upstream.blobs[d] = data
    targets = [
        f"{canary.url}/v2/x/blobs/{d}",  # loopback, another port than the named upstream
        f"http://localhost:{canary.port}/v2/x/blobs/{d}",  # a name that resolves to loopback
        f"http://169.254.169.254:{canary.port}/latest/meta-data",  # link-local (cloud metadata)
        f"http://[::ffff:127.0.0.1]:{canary.port}/v2/x/blobs/{d}",  # v4-mapped loopback
    ]
    before = errors(upstream.hostport, "denied")
    async with proxy(tmp_path / "store", upstream) as client:
        for target in targets:
            upstream.blob_redirects[d] = target
            for method in ("GET", "HEAD"):
                resp = await client.request(method, f"/v2/{ALIAS}/app/blobs/{d}")
                body = await resp.read()
                assert resp.status in (404, 502), (target, method, resp.status)
                assert data[:100] not in body
    assert canary.connections == 0
    assert errors(upstream.hostport, "denied") >= before + len(targets)
    assert "upstream.refused" in caplog.text


async def test_allow_redirect_to_lets_a_listed_target_through(
    tmp_path: Path, upstream: FakeUpstream, canary: FakeUpstream
) -> None:
    data = os.urandom(300_000)
    d = canary.add_blob(data)
    upstream.blob_redirects[d] = f"{canary.url}/v2/x/blobs/{d}"
    settings = {"allow_redirect_to": [canary.hostport]}
    async with proxy(tmp_path / "store", upstream, **settings) as client:
        resp = await client.get(f"/v2/{ALIAS}/app/blobs/{d}")
        assert resp.status == 200
        assert await resp.read() == data
    assert canary.connections >= 1
    # the named host itself is trusted on its own port only: a redirect to another port of it
    # (also loopback) stays refused unless listed
    other = os.urandom(1000)
    d2 = canary.add_blob(other)
    upstream.blob_redirects[d2] = f"{canary.url}/v2/x/blobs/{d2}"
    async with proxy(tmp_path / "store2", upstream) as client:
        resp = await client.get(f"/v2/{ALIAS}/app/blobs/{d2}")
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "UNKNOWN"
