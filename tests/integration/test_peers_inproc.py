"""Peers between regproxy apps in this process (tests/inproc.py): discovery by DNS, a host's own
entry in its list, a peer that is down, and content by digest and by tag from the cluster."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

from tests.inproc import AppDaemon
from tests.peers import free_port, http

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REPO = "spectro-images/docker.io/team/app"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def peer_states(node: AppDaemon) -> dict[str, str]:
    body = json.loads(http("GET", f"{node.url}/readyz")[2])
    return {p["url"]: p["state"] for p in body["peers"]}


def until(check: Callable[[], bool], limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not within the limit"
        time.sleep(0.05)


def push_image(node: AppDaemon, tag: str) -> tuple[str, bytes, list[bytes]]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()})
    cfg, layer = config.encode(), os.urandom(70_000)
    for blob in (cfg, layer):
        status, _, body = http(
            "POST", f"{node.url}/v2/{REPO}/blobs/uploads/?digest={sha(blob)}", blob
        )
        assert status == 201, body
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha(cfg),
            "size": len(cfg),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": sha(layer),
                "size": len(layer),
            }
        ],
    }
    manifest = json.dumps(doc).encode()
    status, _, body = http(
        "PUT",
        f"{node.url}/v2/{REPO}/manifests/{tag}",
        manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert status == 201, body
    return sha(manifest), manifest, [cfg, layer]


def test_a_cluster_found_by_dns_serves_what_one_host_holds(
    app_factory: Callable[..., AppDaemon],
) -> None:
    """B is found through a DNS name (localhost) with the cluster's port; sync is off on A."""
    b = app_factory({"content": {"sync": {"enable": False}}}, name="B")
    digest, manifest, blobs = push_image(b, "v1")
    a = app_factory(
        {
            "content": {"sync": {"enable": False}},
            "peers": {"dns": "localhost", "port": b.port, "timeout": "2s", "refresh": "60s"},
        },
        name="A",
    )
    until(lambda: peer_states(a).get(f"http://127.0.0.1:{b.port}") == "up")
    # by tag (no upstream may answer: the cluster does) and by digest, then the blobs
    status, headers, body = http("GET", f"{a.url}/v2/docker.io/team/app/manifests/v1")
    assert status == 200 and body == manifest, body
    assert headers["Docker-Content-Digest"] == digest
    status, _, body = http("GET", f"{a.url}/v2/docker.io/team/app/manifests/{digest}")
    assert status == 200 and body == manifest
    for blob in blobs:
        status, headers, body = http("GET", f"{a.url}/v2/docker.io/team/app/blobs/{sha(blob)}")
        assert status == 200 and body == blob
        assert headers["Docker-Content-Digest"] == sha(blob)
    assert "fetch.committed" in a.log() and f"source=http://127.0.0.1:{b.port}" in a.log()
    # A holds it now: B may go, A still serves it from its own store
    b.stop()
    for blob in blobs:
        assert http("GET", f"{a.url}/v2/docker.io/team/app/blobs/{sha(blob)}")[2] == blob


def test_a_host_finds_itself_in_the_list_and_never_asks_itself(
    app_factory: Callable[..., AppDaemon],
) -> None:
    port = free_port()
    me = f"http://127.0.0.1:{port}"
    a = app_factory(
        {"content": {"sync": {"enable": False}}, "peers": {"urls": [me], "timeout": "1s"}},
        start=False,
    )
    a.port = port
    a.start()
    until(lambda: peer_states(a).get(me) == "self")
    missing = "sha256:" + "cd" * 32
    status, _, _ = http("GET", f"{a.url}/v2/docker.io/team/app/blobs/{missing}")
    assert status == 404
    assert " peer=lookup" not in a.log()  # no request of its own came back to it
    assert "peers.self" in a.log()


def test_a_peer_that_is_down_is_set_aside_and_misses_still_answer(
    app_factory: Callable[..., AppDaemon],
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    a = app_factory(
        {
            "content": {"sync": {"enable": False}},
            "peers": {"urls": [down], "timeout": "0.5s", "refresh": "60s"},
        }
    )
    until(lambda: peer_states(a).get(down) == "down")
    assert "peers.unreachable" in a.log()
    for path in (
        f"/v2/docker.io/team/app/blobs/sha256:{'ef' * 32}",
        "/v2/docker.io/team/app/manifests/v1",
    ):
        status, _, body = http("GET", a.url + path)
        assert status == 404, body
        assert json.loads(body)["errors"][0]["code"] in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN")
