"""``/readyz``: store writable, index open, listener up; upstreams reported, never required."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_registry
from tests.images import make_image
from tests.peers import Daemon, DockerRegistry, free_port, have, http, push_image


def _readyz(d: Daemon) -> tuple[int, dict[str, Any]]:
    status, _, body = http("GET", f"{d.url}/readyz")
    return status, json.loads(body)


def _ready_metric(d: Daemon) -> float:
    _, _, body = http("GET", f"{d.url}/metrics")
    line = next(x for x in body.decode().splitlines() if x.startswith("regproxy_ready "))
    return float(line.split()[1])


def test_ready_and_not_ready_when_the_store_takes_no_writes(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory()
    status, body = _readyz(d)
    assert status == 200, body
    assert body["ready"] is True
    assert body["checks"] == {"store_writable": True, "index_open": True, "listener": True}
    assert body["upstreams"] == {}
    tmp = d.root / "store" / "tmp"
    assert list(tmp.iterdir()) == []  # the probe file is gone

    # root ignores permissions: make tmp/ a file, so nothing can be created in it
    shutil.rmtree(tmp)
    tmp.write_text("")
    try:
        # the failing check ends at once; on a loaded machine a probe may still answer with
        # the one before it (see health.ANSWER_SECONDS), so a few probes at most
        for _ in range(50):
            status, body = _readyz(d)
            if status == 503:
                break
            time.sleep(0.1)
        assert status == 503, body
        assert body["ready"] is False
        assert body["checks"]["store_writable"] is False
        assert body["checks"]["index_open"] is True
        assert "store_writable" in body["errors"]
        assert _ready_metric(d) == 0  # what the alert on lost readiness reads
    finally:
        tmp.unlink()
        tmp.mkdir()
    for _ in range(50):
        status, body = _readyz(d)
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200, body
    assert _ready_metric(d) == 1
    # /healthz stays what it was: alive
    assert http("GET", f"{d.url}/healthz")[0] == 200


def _pull(d: Daemon, ref: str) -> int:
    status, _, _ = http(
        "GET",
        f"{d.url}/v2/{ref}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    return status


def _wait_state(d: Daemon, source: str, state: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status, body = _readyz(d)
        assert status == 200, body  # whatever the upstreams do, this host is ready
        if body["upstreams"].get(source, {}).get("state") == state:
            return body
        time.sleep(0.1)
    raise AssertionError(f"{source} never became {state}: {body}")


@needs_registry
@pytest.mark.skipif(not have("skopeo"), reason="skopeo missing")
def test_upstream_state_is_reported_not_required(
    daemon_factory: Callable[..., Daemon],
    registry_factory: Callable[..., DockerRegistry],
    tmp_path: Path,
) -> None:
    up = registry_factory()
    img = make_image("amd64")
    push_image(img, tmp_path / "layout", f"{up.hostport}/team/app:v1")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    d = daemon_factory(
        {
            "upstreams": {
                up.hostport: {"url": up.url, "alias": "up.example"},
                dead: {"url": f"http://{dead}", "alias": "dead.example", "connect_timeout": "1s"},
            }
        }
    )
    requests_before = len(up.log().splitlines())
    status, body = _readyz(d)
    assert status == 200 and body["upstreams"] == {}, body
    for _ in range(5):  # /readyz dials nothing
        _readyz(d)
    assert len(up.log().splitlines()) == requests_before

    assert _pull(d, "spectro-images/up.example/team/app/manifests/v1") == 200
    body = _wait_state(d, up.hostport, "reachable")
    assert body["upstreams"][up.hostport]["last_ok"] is not None

    assert _pull(d, "spectro-images/dead.example/team/app/manifests/v1") >= 500
    body = _wait_state(d, dead, "unreachable")
    assert body["upstreams"][dead]["last_failure_kind"] in ("connect", "timeout")
    assert body["upstreams"][up.hostport]["state"] == "reachable"
    assert body["ready"] is True

    # the upstream goes away: still ready, and what is cached still serves
    up.stop()
    assert _pull(d, f"spectro-images/up.example/team/app/manifests/{img.digest}") == 200
    assert _readyz(d)[0] == 200


@needs_registry
@pytest.mark.skipif(not have("skopeo"), reason="skopeo missing")
def test_prefetch_required_for_ready(
    daemon_factory: Callable[..., Daemon],
    registry_factory: Callable[..., DockerRegistry],
    tmp_path: Path,
) -> None:
    port = free_port()  # the upstream is down when regproxy starts
    d = daemon_factory(
        {
            "upstreams": {f"127.0.0.1:{port}": {"url": f"http://127.0.0.1:{port}"}},
            "prefetch": {
                "images": [f"127.0.0.1:{port}/team/app:v1"],
                "required_for_ready": True,
            },
        }
    )
    status, body = _readyz(d)
    assert status == 503, body
    assert body["checks"]["prefetch_done"] is False
    assert body["checks"]["store_writable"] is True

    up = registry_factory(port=port)
    push_image(make_image("amd64"), tmp_path / "layout", f"{up.hostport}/team/app:v1")
    deadline = time.monotonic() + 30  # the prefetcher's backoff decides when it tries again
    while time.monotonic() < deadline and _readyz(d)[0] != 200:
        time.sleep(0.2)
    status, body = _readyz(d)
    assert status == 200, (body, d.log())
    assert body["checks"]["prefetch_done"] is True


def test_prefetch_not_required_is_not_a_check(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory({"prefetch": {"images": ["127.0.0.1:1/team/app:v1"]}})
    status, body = _readyz(d)
    assert status == 200, body
    assert "prefetch_done" not in body["checks"]
