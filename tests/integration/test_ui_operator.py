"""The web page's numbers as an operator checks them (in-process daemons on 127.0.0.1): a push
is not a pull, a deleted index takes its pins with it, "stale" means served stale, peers are
not upstreams."""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
import pytest

from regproxy.web_keys import INSTANCE_KEY, METRICS_KEY, REGISTRY_KEY
from tests.fakes import FakeUpstream
from tests.images import OCI_INDEX, OCI_MANIFEST, make_image, make_index, sha256
from tests.inproc import FakeTime
from tests.uiclient import AUTH, PASSWORD, get_json, login, post, push, put_manifest, start

# api keeps per-request facts under plain string keys (request["error"]), as test_auth says
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
REPO = "spectro-images/team/app"
OTHER = "spectro-images/team/base"


async def test_a_push_moves_neither_the_hit_ratio_nor_last_pulled(tmp_path: Path) -> None:
    client = await start(tmp_path / "store")
    try:
        await login(client)
        base = make_image(layer_sizes=(3000,))
        await push(client, OTHER, "1", base)
        before = (await get_json(client, "/ui/api/overview"))["cache"]
        # a push into REPO: its client HEADs the blobs here and in the repository it came from
        # (as containers/image does to find a blob it may mount), then uploads what is missing
        for blob in (base.config, *base.layers):
            resp = await client.head(f"/v2/{OTHER}/blobs/{sha256(blob)}", headers=AUTH)
            assert resp.status == 200
        img = make_image()
        for _ in range(5):
            await push(client, REPO, "v1", img)
        after = (await get_json(client, "/ui/api/overview"))["cache"]
        assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
        assert after["hit_ratio"] == before["hit_ratio"]
        for name in (REPO, OTHER):
            tags = await get_json(client, f"/ui/api/repositories/{name}/tags")
            assert tags["repository"]["last_pulled"] is None, name
            assert all(t["last_pulled"] is None for t in tags["tags"]), name

        # a pull is a pull: the manifest and its blobs are hits, and both say when
        resp = await client.get(
            f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST, **AUTH}
        )
        assert resp.status == 200
        for blob in (img.config, *img.layers):
            resp = await client.get(f"/v2/{REPO}/blobs/{sha256(blob)}", headers=AUTH)
            assert resp.status == 200 and await resp.read() == blob
        pulled = (await get_json(client, "/ui/api/overview"))["cache"]
        assert pulled["hits"] == after["hits"] + 1 + 1 + len(img.layers)
        assert pulled["misses"] == after["misses"]
        tags = await get_json(client, f"/ui/api/repositories/{REPO}/tags")
        assert tags["repository"]["last_pulled"] is not None
        assert tags["tags"][0]["last_pulled"] is not None
        other = await get_json(client, f"/ui/api/repositories/{OTHER}/tags")
        assert other["repository"]["last_pulled"] is None
    finally:
        await client.close()


async def test_deleting_a_pinned_index_unpins_its_children(tmp_path: Path) -> None:
    client = await start(tmp_path / "store")
    try:
        csrf = await login(client)
        a, b = make_image("amd64"), make_image("arm64")
        for img in (a, b):
            await push(client, REPO, img.digest.replace(":", "-"), img)
        index = make_index({"amd64": a, "arm64": b})
        digest = await put_manifest(client, REPO, "multi", index, OCI_INDEX)
        for img in (a, b):  # the platforms' own tags go: only the index names them
            resp = await post(
                client,
                "/ui/delete",
                csrf=csrf,
                repo=REPO,
                ref=img.digest.replace(":", "-"),
                confirm="1",
            )
            assert resp.status == 200
        m = await get_json(client, f"/ui/api/manifests/{REPO}@{digest}")
        assert m["pinned"] is True
        size = (await get_json(client, f"/ui/api/repositories/{REPO}/tags"))["repository"]["size"]
        overview = await get_json(client, "/ui/api/overview")
        assert overview["store"]["pinned"] > 0
        assert overview["store"]["unreferenced"] == 0

        # without JavaScript, the first click asks (and says what the pin means)
        resp = await post(client, "/ui/delete", csrf=csrf, repo=REPO, ref=digest)
        text = await resp.text()
        assert resp.status == 200 and 'name="confirm"' in text and "pinned" in text
        assert (await get_json(client, f"/ui/api/manifests/{REPO}@{digest}"))["pinned"]

        resp = await post(client, "/ui/delete", csrf=csrf, repo=REPO, ref=digest, confirm="1")
        assert resp.status == 200, await resp.text()
        assert "next eviction or gc" in await resp.text()
        tags = await get_json(client, f"/ui/api/repositories/{REPO}/tags")
        left = {t["digest"]: t for t in tags["untagged"]}
        assert set(left) == {a.digest, b.digest}
        assert not any(t["pinned"] for t in left.values())
        assert tags["repository"]["size"] == size - len(index)  # the size drops at once
        overview = await get_json(client, "/ui/api/overview")
        assert overview["store"]["pinned"] == 0
        assert overview["store"]["unreferenced"] == len(index)

        # the API's DELETE does the same
        index2 = make_index({"amd64": a})
        d2 = await put_manifest(client, REPO, "one", index2, OCI_INDEX)
        resp = await post(client, "/ui/pin", csrf=csrf, repo=REPO, ref="one")  # with its child
        assert resp.status == 200
        assert (await get_json(client, f"/ui/api/manifests/{REPO}@{a.digest}"))["pinned"]
        resp = await client.delete(f"/v2/{REPO}/manifests/{d2}", headers=AUTH)
        assert resp.status == 202
        assert not (await get_json(client, f"/ui/api/manifests/{REPO}@{a.digest}"))["pinned"]
    finally:
        await client.close()


async def test_a_quiet_host_shows_no_stale_until_the_upstream_cannot_confirm(
    tmp_path: Path,
) -> None:
    up = await FakeUpstream().start()
    img = make_image()
    for blob in (img.config, *img.layers):
        up.add_blob(blob)
    up.add_manifest("team/app", "v1", img.manifest, OCI_MANIFEST)
    # tag_ttl 0: every request re-checks the tag, so "older than tag_ttl" holds at once
    client = await start(
        tmp_path / "store",
        content={"sync": {"enable": True}},
        upstreams={up.hostport: {"url": up.url, "alias": "up.test"}},
        tag_ttl=0,
    )
    name = "spectro-images/up.test/team/app"
    manifest = f"/v2/{name}/manifests/v1"
    try:
        await login(client)
        assert (await client.get(manifest, headers=AUTH)).status == 200
        assert (await client.get(manifest, headers=AUTH)).status == 200  # confirmed by a HEAD
        tags = await get_json(client, f"/ui/api/repositories/{name}/tags")
        assert tags["tags"][0]["stale"] is False
        page = await (await client.get(f"/ui/repositories/{name}")).text()
        assert 'class="pill warn"' not in page
        overview = await get_json(client, "/ui/api/overview")
        served_stale = overview["health"]["stale_tags_served"]
        assert overview["health"]["verdict"] == "healthy", overview["health"]

        await up.stop()  # the upstream cannot confirm: the tag is served stale, and says so
        assert (await client.get(manifest, headers=AUTH)).status == 200
        tags = await get_json(client, f"/ui/api/repositories/{name}/tags")
        assert tags["tags"][0]["stale"] is True
        page = await (await client.get(f"/ui/repositories/{name}")).text()
        assert 'class="pill warn"' in page and "the upstream could not confirm it" in page
        only = await get_json(client, f"/ui/api/repositories/{name}/tags?show=stale")
        assert [t["tag"] for t in only["tags"]] == ["v1"]
        overview = await get_json(client, "/ui/api/overview")
        assert overview["health"]["stale_tags_served"] == served_stale + 1
        health = overview["health"]
        assert health["verdict"] == "degraded" and health["ready"] is True
        assert any("served stale" in w for w in health["warnings"]), health
        assert any(f"upstream {up.hostport} is not answering" in w for w in health["warnings"])

        await up.start()  # back on its port: the next request confirms the tag
        assert (await client.get(manifest, headers=AUTH)).status == 200
        tags = await get_json(client, f"/ui/api/repositories/{name}/tags")
        assert tags["tags"][0]["stale"] is False
        registry = client.server.app[REGISTRY_KEY]
        assert (name, "v1") in registry.stale_served  # remembered, but a later check wins
    finally:
        await client.close()
        await up.stop()


async def test_peer_bytes_are_peer_bytes_not_upstream_bytes(tmp_path: Path) -> None:
    """A host with sync off fetches a blob from its peer: the page counts it as fetched from
    peers (and served as it arrived from a peer), lists the peer in its panel with those bytes,
    and never as an upstream."""
    peer = await start(tmp_path / "peer")
    img = make_image(layer_sizes=(50_000,))
    try:
        await push(peer, REPO, "v1", img)
        peer_url = f"http://127.0.0.1:{peer.server.port}"
        host = await start(
            tmp_path / "host",
            peers={"urls": [peer_url], "username": "alice", "password": PASSWORD},
        )
        try:
            await login(host)
            before = await get_json(host, "/ui/api/overview")
            layer = img.layers[0]
            resp = await host.get(f"/v2/{REPO}/blobs/{sha256(layer)}", headers=AUTH)
            assert resp.status == 200 and await resp.read() == layer
            after = await get_json(host, "/ui/api/overview")
            cache, was = after["cache"], before["cache"]
            assert cache["fetched_peers"] - was["fetched_peers"] == len(layer)
            assert cache["fetched_upstream"] == was["fetched_upstream"]
            assert cache["served_from_peers"] - was["served_from_peers"] == len(layer)
            assert cache["served_from_upstream"] == was["served_from_upstream"]
            (row,) = after["peers"]
            assert row["url"] == peer_url and row["state"] == "reachable"
            assert row["bytes_from"] == len(layer)
            assert peer_url not in {s["source"] for s in after["other_sources"]}
            page = await (await host.get("/ui/")).text()
            assert 'id="peers"' in page and peer_url in page
        finally:
            await host.close()
    finally:
        await peer.close()


async def test_the_upstream_table_shows_the_pull_limit_and_the_reserve(tmp_path: Path) -> None:
    """Docker Hub's rate-limit headers as the page shows them: pulls left of the limit per
    upstream, and once below ``ratelimit_reserve``, that moved tags are served stale (with a
    warning in the verdict and how many were)."""
    up = await FakeUpstream().start()
    v1, v2 = make_image(), make_image()
    for img in (v1, v2):
        for blob in (img.config, *img.layers):
            up.add_blob(blob)
    up.add_manifest("team/app", "v1", v1.manifest, OCI_MANIFEST)
    up.manifest_headers = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "50;w=21600"}
    client = await start(
        tmp_path / "store",
        content={"sync": {"enable": True}},
        upstreams={up.hostport: {"url": up.url, "alias": "up.test", "ratelimit_reserve": 10}},
        tag_ttl=0,  # every request re-checks the tag
    )
    manifest = "/v2/spectro-images/up.test/team/app/manifests/v1"
    accept = {"Accept": OCI_MANIFEST, **AUTH}
    try:
        await login(client)
        assert (await client.get(manifest, headers=accept)).status == 200
        overview = await get_json(client, "/ui/api/overview")
        (row,) = overview["upstreams"]
        (source,) = row["sources"]
        limit = source["ratelimit"]
        assert (limit["remaining"], limit["limit"], limit["reserve"]) == (50, 100, 10)
        assert limit["below_reserve"] is False and limit["held_tags"] == 0
        assert overview["health"]["verdict"] == "healthy", overview["health"]
        page = await (await client.get("/ui/")).text()
        assert "50 of 100 pulls left" in page and "below the reserve" not in page

        # 5 left, and the tag moves upstream: served stale, no GET spends the reserve
        up.manifest_headers["ratelimit-remaining"] = "5;w=21600"
        up.add_manifest("team/app", "v1", v2.manifest, OCI_MANIFEST)
        gets = up.count("GET", "/manifests/v1")
        resp = await client.get(manifest, headers=accept)
        assert resp.status == 200 and await resp.read() == v1.manifest
        assert up.count("GET", "/manifests/v1") == gets
        overview = await get_json(client, "/ui/api/overview")
        limit = overview["upstreams"][0]["sources"][0]["ratelimit"]
        assert (limit["remaining"], limit["below_reserve"], limit["held_tags"]) == (5, True, 1)
        assert limit["held_at"] is not None
        health = overview["health"]
        assert health["verdict"] == "degraded", health
        assert any("below the reserve of 10" in w for w in health["warnings"]), health
        page = await (await client.get("/ui/")).text()
        assert "5 of 100 pulls left" in page
        assert "below the reserve of 10: moved tags served stale" in page
        assert "1 moved tag(s) served stale to keep the reserve" in page

        # the window resets: the figure follows, the warning goes, the tag moves
        up.manifest_headers["ratelimit-remaining"] = "99;w=21600"
        resp = await client.get(manifest, headers=accept)
        assert await resp.read() == v2.manifest
        limit = (await get_json(client, "/ui/api/overview"))["upstreams"][0]["sources"][0][
            "ratelimit"
        ]
        assert (limit["remaining"], limit["below_reserve"]) == (99, False)
    finally:
        await client.close()
        await up.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_peers_panel_shows_bytes_served_to_each_peer(tmp_path: Path) -> None:
    """Host A lists B and C (C never answers), both on 127.0.0.1: a blob B fetches from A is
    counted on A as served to B (by B's address and, with two peers on it, the instance id B
    names and A learnt from probing B), and on B as fetched from A. The marker from a client
    that is not a peer of the list (another address, or no instance on a shared one) grows
    no figure and no metric label."""
    clock = FakeTime()
    b_port, c_port = _free_port(), _free_port()
    b_url, c_url = f"http://127.0.0.1:{b_port}", f"http://127.0.0.1:{c_port}"
    a = await start(tmp_path / "a", timing=clock.timing, peers={"urls": [b_url, c_url]})
    img = make_image(layer_sizes=(40_000,))
    layer = img.layers[0]
    blob = f"/v2/{REPO}/blobs/{sha256(layer)}"
    try:
        await push(a, REPO, "v1", img)
        a_url = f"http://127.0.0.1:{a.server.port}"
        b = await start(
            tmp_path / "b",
            server_port=b_port,
            peers={"urls": [a_url], "username": "alice", "password": PASSWORD},
        )
        try:
            await login(a)
            await login(b)
            a_peers = a.server.app[REGISTRY_KEY].peers
            clock.advance(120)  # B's first probe failed (it was not up): probe it again now
            await a_peers.probe_due()
            resp = await b.get(blob, headers=AUTH)
            assert resp.status == 200 and await resp.read() == layer
            rows = {p["url"]: p for p in (await get_json(a, "/ui/api/overview"))["peers"]}
            assert rows[b_url]["bytes_to"] == len(layer)
            assert rows[c_url]["bytes_to"] == 0
            (b_row,) = (await get_json(b, "/ui/api/overview"))["peers"]
            assert b_row["bytes_from"] == len(layer)
            page = await (await a.get("/ui/")).text()
            assert "Served to it" in page

            # the marker from elsewhere: served, but counted for no peer
            b_instance = b.server.app[INSTANCE_KEY]
            hostile = {"Regproxy-Peer": "1", "Regproxy-Instance": b_instance, **AUTH}
            connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with (
                aiohttp.ClientSession(connector=connector) as other,
                other.get(f"{a_url}{blob}", headers=hostile) as r,
            ):
                assert r.status == 200 and await r.read() == layer
            # from the peers' address, naming no peer's instance: B or C? neither
            for instance in ("", "forged", a.server.app[INSTANCE_KEY]):
                r = await a.get(blob, headers={**hostile, "Regproxy-Instance": instance})
                assert r.status == 200 and await r.read() == layer
            assert a_peers.served == {b_url: len(layer)}
            assert a.server.app[METRICS_KEY].registry.get_sample_value(
                "regproxy_peer_served_bytes_total", {"peer": b_url}
            ) == len(layer)
        finally:
            await b.close()
    finally:
        await a.close()
