"""Multi-node: regproxy daemons on loopback ports acting as one cache (issue: peers)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import time
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import BlobFault, FakeUpstream
from tests.images import make_image, write_layout
from tests.peers import free_port, http, push_image, skopeo, skopeo_raw, write_hosts_toml


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_for_each_other(nodes, limit: float = 30.0) -> None:
    """Until every host sees all the others up (/readyz lists the peers), bounded."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        states = [json.loads(http("GET", f"{n.url}/readyz")[2])["peers"] for n in nodes]
        if all(all(p["state"] in ("up", "self") for p in s) for s in states):
            return
        time.sleep(0.1)
    raise AssertionError(f"the hosts did not find each other within {limit:g} s: {states}")


def three(daemon_factory, sync: list[bool], extra: dict | None = None):
    ports = [free_port() for _ in range(3)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    out = []
    for i, port in enumerate(ports):
        cfg = {
            "content": {"sync": {"enable": sync[i]}},
            "peers": {"urls": urls, "timeout": "1s", "refresh": "1s"},
            **(extra or {}),
        }
        d = daemon_factory(cfg, start=False, name="ABC"[i])
        d.port = port
        out.append(d)
    for d in out:
        d.start()
    return out


@pytest.mark.peers
def test_air_gapped_cluster_shares_what_one_host_holds(
    tmp_path: Path, daemon_factory, containerd
) -> None:
    """A bundle imported on A only; B and C (sync disabled) serve it; A stops, B serves C."""
    a, b, c = three(daemon_factory, [False, False, False])
    img1, img2 = make_image("amd64"), make_image("amd64", layer_sizes=(3000, 90_000))
    layout = tmp_path / "layout"
    write_layout(layout, {"one": img1, "two": img2})
    bundle = tmp_path / "bundle.tar"
    skopeo("copy", f"oci:{layout}:one", f"oci-archive:{bundle}:docker.io/team/app:one")
    status, _, body = http("POST", f"{a.url}/admin/import", bundle.read_bytes())
    assert status == 200, body
    bundle2 = tmp_path / "bundle2.tar"
    skopeo("copy", f"oci:{layout}:two", f"oci-archive:{bundle2}:docker.io/team/app:two")
    assert http("POST", f"{a.url}/admin/import", bundle2.read_bytes())[0] == 200

    # C, never given anything: skopeo by tag and by digest
    assert sha(skopeo_raw(f"{c.hostport}/docker.io/team/app:one")) == img1.digest
    out = tmp_path / "out"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{c.hostport}/docker.io/team/app@{img1.digest}",
        f"dir:{out}",
    )
    assert sha((out / "manifest.json").read_bytes()) == img1.digest
    # and containerd on C's side, by tag and by digest, through hosts.toml (?ns=docker.io)
    hosts = tmp_path / "hosts"
    write_hosts_toml(hosts, "docker.io", c.url)
    containerd.pull(hosts, "docker.io/team/app:one")
    containerd.pull(hosts, f"docker.io/team/app@{img1.digest}")
    assert img1.digest in containerd.ctr("images", "ls").stdout
    # B pulls the second image (from A); then A goes away: C's next miss comes from B
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{b.hostport}/docker.io/team/app:two",
        f"dir:{tmp_path / 'b2'}",
    )
    a.stop()
    out2 = tmp_path / "out2"
    skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{c.hostport}/docker.io/team/app:two",
        f"dir:{out2}",
    )
    assert sha((out2 / "manifest.json").read_bytes()) == img2.digest
    for blob in img2.layers:
        assert (out2 / sha(blob)[7:]).read_bytes() == blob
    assert re.search(rf"fetch.committed .*source=http://127.0.0.1:{b.port}", c.log())


@pytest.mark.peers
def test_pulled_on_three_hosts_crosses_upstream_once(
    tmp_path: Path, registry_factory, daemon_factory
) -> None:
    up = registry_factory()
    img = make_image("amd64", layer_sizes=(300_000, 2_000_000))
    push_image(img, tmp_path / "layout", f"{up.hostport}/team/app:v1")
    nodes = three(
        daemon_factory,
        [True, True, True],
        {"upstreams": {up.hostport: {"url": up.url, "alias": "up.test"}}},
    )
    wait_for_each_other(nodes)

    def pull(node) -> Path:
        out = tmp_path / f"out-{node.port}"
        skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{node.hostport}/up.test/team/app:v1",
            f"dir:{out}",
        )
        return out

    # all three at the same moment, each missing everything: the home hosts fetch, once
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(pull, nodes))
    for out in outs:
        assert sha((out / "manifest.json").read_bytes()) == img.digest
        for blob in (img.config, *img.layers):
            assert (out / sha(blob)[7:]).read_bytes() == blob
    for blob in (img.config, *img.layers):
        assert up.requests("GET", f"/blobs/{sha(blob)}") == 1, sha(blob)
    assert up.requests("GET", "/manifests/") + up.requests("HEAD", "/manifests/") == 1


def test_peers_never_ask_in_a_circle(app_factory) -> None:
    """In-process apps (tests/inproc.py): each app's log holds only its own lines."""
    a_port, b_port = free_port(), free_port()
    urls = [f"http://127.0.0.1:{a_port}", f"http://127.0.0.1:{b_port}"]
    cfg = {
        "content": {"sync": {"enable": False}},
        "peers": {"urls": urls, "timeout": "1s", "refresh": "0.5s"},
    }
    a = app_factory(cfg, start=False, name="A")
    b = app_factory(cfg, start=False, name="B")
    a.port, b.port = a_port, b_port
    a.start()
    b.start()
    # A probed B before B was up: B is back in A's list after a refresh
    wait_for_each_other([a, b])
    missing = "sha256:" + "ab" * 32
    paths = (
        f"/v2/docker.io/x/app/blobs/{missing}",
        "/v2/docker.io/x/app/manifests/v9",
        f"/v2/docker.io/x/app/manifests/{missing}",
    )
    for path in paths:
        status, _, body = http("GET", a.url + path)
        assert status == 404, path
        assert json.loads(body)["errors"][0]["code"] in (
            "BLOB_UNKNOWN",
            "MANIFEST_UNKNOWN",
            "NAME_UNKNOWN",
        )

    # each miss on A asked B once (a lookup: peer=lookup in B's access log); B answered from
    # its store and asked nobody (no lookup ever reached A)
    def lookups(node) -> list[str]:
        return [
            line
            for line in node.log().splitlines()
            if " request " in line and "/x/app/" in line and " peer=lookup" in line
        ]

    # B writes its access line after its answer is on the wire, so A's 404 can reach the client
    # first: wait for the third line (bounded), then check nothing more came
    deadline = time.monotonic() + 10
    while len(lookups(b)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lookups(a) == [], a.log()
    assert len(lookups(b)) == 3, b.log()


async def test_lying_peer_is_never_stored_and_next_source_used(app_factory) -> None:
    liar = await FakeUpstream().start()
    good = await FakeUpstream().start()
    try:
        data = os.urandom(800_000)
        d = liar.add_blob(data)
        good.add_blob(data)
        liar.blob_faults[d] = BlobFault(corrupt=True)
        cfg = {
            "upstreams": {good.hostport: {"url": good.url, "alias": "good.test"}},
            "peers": {"urls": [liar.url], "timeout": "1s", "refresh": "60s"},
        }
        proxy = await asyncio.to_thread(app_factory, cfg)
        canonical = "spectro-images/good.test/app"
        url = f"{proxy.url}/v2/{canonical}/blobs/{d}"
        bodies = []
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # the first response may be cut (it tailed the liar); never wrong
                try:
                    async with s.get(url) as r:
                        bodies.append(await r.read())
                except aiohttp.ClientPayloadError:
                    bodies.append(None)
        assert bodies[-1] == data
        assert all(b is None or b == data for b in bodies)
        assert liar.count("GET", d) == 1  # put aside after it lied
        assert good.count("GET", d) == 1
        stored = proxy.root / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == d[7:]
    finally:
        await liar.stop()
        await good.stop()


def test_blob_delete_sticks_in_a_local_repository_with_peers(app_factory) -> None:
    """Peers configured: a pushed repository's deleted blob is not linked back from the store."""
    lonely = f"http://127.0.0.1:{free_port()}"  # a peer that is down
    proxy = app_factory({"peers": {"urls": [lonely], "timeout": "0.5s"}})
    data = os.urandom(5000)
    d = sha(data)
    assert (
        http("POST", f"{proxy.url}/v2/spectro-images/mine/blobs/uploads/?digest={d}", data)[0]
        == 201
    )
    assert (
        http("POST", f"{proxy.url}/v2/spectro-images/other/blobs/uploads/?digest={d}", data)[0]
        == 201
    )
    assert http("DELETE", f"{proxy.url}/v2/spectro-images/mine/blobs/{d}")[0] == 202
    status, _, body = http("GET", f"{proxy.url}/v2/spectro-images/mine/blobs/{d}")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert http("GET", f"{proxy.url}/v2/spectro-images/other/blobs/{d}")[2] == data
