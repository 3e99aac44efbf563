"""Home hosts (regproxy.cluster): the cluster crosses the internet once per blob and re-checks a
tag once per tag_ttl; a home that goes away, lies or disagrees costs time, never a wrong byte.

In process: several apps in one event loop behind relays of the tests' own, one fake upstream,
one fake clock (tests/inproc_cluster.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from regproxy.oci import Digest
from regproxy.rendezvous import order
from tests.fakes import BlobFault, FakeUpstream, digest_of
from tests.inproc_cluster import PROJECT, Cluster, Host, cluster

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def home_of(c: Cluster, key: str) -> tuple[Host, list[Host]]:
    """The key's home host and the others, in the key's rendezvous order."""
    by_url = {h.url: h for h in c.hosts}
    ranked = [by_url[u] for u in order(by_url, key)]
    return ranked[0], ranked[1:]


def stored(host: Host, digest: str) -> bytes | None:
    path = host.registry.store.blob_path(Digest.parse(digest))
    return path.read_bytes() if path.exists() else None


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


async def fetch_verified(c: Cluster, url: str, data: bytes, attempts: int = 3) -> bytes:
    """GET until a whole body comes (a response that tailed a source which went away is cut,
    never finished with wrong bytes); every body that does finish is the exact data."""
    for _ in range(attempts):
        try:
            async with c.session.get(url) as r:
                assert r.status == 200, await r.text()
                body = await r.read()
        except aiohttp.ClientPayloadError:
            continue
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        return body
    raise AssertionError(f"{url}: no whole body in {attempts} attempts")


async def test_hosts_missing_a_blob_at_once_cause_one_upstream_transfer(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as c:
        data = os.urandom(3 * 1024 * 1024)
        d = c.upstream.add_blob(data)
        c.upstream.blob_faults[d] = BlobFault(delay=0.002)  # long enough for all to overlap
        bodies = await asyncio.gather(*(fetch_verified(c, c.blob_url(h, d), data) for h in c))
        assert all(b == data for b in bodies)
        assert c.upstream.count("GET", f"/blobs/{d}") == 1
        for h in c.hosts:  # every host holds it now, verified, and nothing is left in flight
            assert stored(h, d) == data, h.name
            assert h.registry.fetcher.get(Digest.parse(d)) is None


async def test_a_tag_is_checked_upstream_once_per_ttl_across_hosts(tmp_path: Path) -> None:
    async with cluster(tmp_path, 4) as c:
        v1, v2 = manifest(b'{"v":1}'), manifest(b'{"v":2}')
        d1 = c.upstream.add_manifest("app", "latest", v1, OCI_MANIFEST)
        for h in c.hosts:  # the first pull: the home fetches, the others ask it
            status, body, _ = await c.get(c.manifest_url(h, "latest"))
            assert status == 200 and body == v1
        assert c.upstream.count("", "/manifests/") == 1
        c.clock.advance(30)  # within tag_ttl (60 s): nobody asks anybody
        for h in c.hosts:
            assert (await c.get(c.manifest_url(h, "latest")))[1] == v1
        assert c.upstream.count("", "/manifests/") == 1
        c.clock.advance(31)  # past tag_ttl everywhere: one HEAD for the whole cluster
        for h in c.hosts:
            status, body, headers = await c.get(c.manifest_url(h, "latest"))
            assert status == 200 and body == v1 and headers["Docker-Content-Digest"] == d1
        assert c.upstream.count("HEAD", "/manifests/latest") == 1
        assert c.upstream.count("GET", "/manifests/") == 1
        # the tag moves upstream: after tag_ttl one HEAD and one GET, all hosts follow
        d2 = c.upstream.add_manifest("app", "latest", v2, OCI_MANIFEST)
        c.clock.advance(61)
        for h in reversed(c.hosts):
            status, body, headers = await c.get(c.manifest_url(h, "latest"))
            assert body == v2 and headers["Docker-Content-Digest"] == d2
        assert c.upstream.count("HEAD", "/manifests/latest") == 2
        assert c.upstream.count("GET", "/manifests/") == 2
        # a host that asked the home learnt how fresh the home's answer was: no request
        # before tag_ttl has passed since the home's own check
        c.clock.advance(59)
        before = sum(h.relay.connections for h in c.hosts)
        for h in c.hosts:
            assert (await c.get(c.manifest_url(h, "latest")))[1] == v2
        assert c.upstream.count("HEAD", "/manifests/latest") == 2
        assert sum(h.relay.connections for h in c.hosts) - before <= len(c.hosts)


async def test_manifests_by_digest_come_from_the_home_host(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as c:
        body = manifest(b'{"m":1}')
        d = c.upstream.add_manifest("app", "v1", body, OCI_MANIFEST)
        results = await asyncio.gather(*(c.get(c.manifest_url(h, d)) for h in c.hosts))
        assert all(status == 200 and got == body for status, got, _ in results)
        assert c.upstream.count("", f"/manifests/{d}") == 1


async def test_home_host_down_mid_transfer_the_others_finish_verified(tmp_path: Path) -> None:
    async with cluster(tmp_path, 3) as c:
        data = os.urandom(4 * 1024 * 1024)
        d = c.upstream.add_blob(data)
        rest = asyncio.Event()  # the upstream sends 1 MiB, then waits until the home is gone
        c.upstream.blob_faults[d] = BlobFault(hold_at=1024 * 1024, gate=rest)
        home, others = home_of(c, d)
        # one attempt each: the others continue from their upstream where the home stopped
        # (a Range request), so the responses in progress are not cut
        pulls = [
            asyncio.create_task(fetch_verified(c, c.blob_url(h, d), data, attempts=1))
            for h in others
        ]
        try:
            # wait (bounded) until both others are tailing the home's transfer, then take it away
            for _ in range(500):
                transfers = [h.registry.fetcher.get(Digest.parse(d)) for h in others]
                if all(t is not None and t.written > 0 for t in transfers):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the others never started tailing the home host")
            home.relay.kill()
        finally:
            rest.set()
        bodies = await asyncio.gather(*pulls)
        assert all(b == data for b in bodies)
        for h in others:
            assert stored(h, d) == data, h.name  # committed only after the digest matched
            assert not h.peers.liveness.is_up(home.url)  # set aside
        assert 1 <= c.upstream.count("GET", f"/blobs/{d}") <= 3


async def test_a_lying_peer_is_put_aside_and_never_stored(tmp_path: Path) -> None:
    liar = await FakeUpstream().start()
    try:
        async with cluster(tmp_path, 1, extra_peers=(liar.url,)) as c:
            (host,) = c.hosts
            data = os.urandom(600_000)
            d = c.upstream.add_blob(data)
            liar.add_blob(data)
            liar.blob_faults[d] = BlobFault(corrupt=True)
            body = await fetch_verified(c, c.blob_url(host, d), data)
            assert body == data and stored(host, d) == data
            assert liar.count("GET", d) == 1
            assert not host.peers.liveness.is_up(liar.url)
            # set aside: the next miss does not ask it (no lookup, no fetch request)
            other = os.urandom(100_000)
            d2 = c.upstream.add_blob(other)
            liar.add_blob(other)
            asked = liar.count("", "/blobs/")
            assert await fetch_verified(c, c.blob_url(host, d2), other) == other
            assert liar.count("", "/blobs/") == asked
    finally:
        await liar.stop()


async def test_hosts_that_disagree_on_the_home_never_wait_on_each_other(tmp_path: Path) -> None:
    """Each host lists only the other: each thinks the other is the home of everything. Each
    one's transfer is fed by a fetch request to the other, so neither joins the other's:
    both answer the other's request with a miss and go upstream. Nobody hangs."""
    async with cluster(tmp_path, 2, urls_for=lambda i, urls: [urls[1 - i]]) as c:
        a, b = c.hosts
        assert a.peers.own is None and b.peers.own is None
        data = os.urandom(2 * 1024 * 1024)
        d = c.upstream.add_blob(data)
        c.upstream.blob_faults[d] = BlobFault(delay=0.002)
        bodies = await asyncio.wait_for(
            asyncio.gather(*(fetch_verified(c, c.blob_url(h, d), data) for h in (a, b))), 30
        )
        assert bodies == [data, data]
        assert stored(a, d) == data and stored(b, d) == data
        assert 1 <= c.upstream.count("GET", f"/blobs/{d}") <= 2


async def test_hosts_with_sync_off_serve_what_one_imported(tmp_path: Path) -> None:
    """Five air-gapped hosts: content pushed to one is served by all, whichever digests'
    homes it is not (the near hosts miss, the remaining peers are looked up)."""
    async with cluster(tmp_path, 5, sync=[False] * 5) as c:
        first = c.hosts[0]
        repo = f"{PROJECT}/docker.io/team/app"
        layers = [os.urandom(n) for n in (5000, 150_000, 70_000, 1234)]
        config = b'{"architecture":"amd64","os":"linux"}'
        for blob in (config, *layers):
            url = f"{first.url}/v2/{repo}/blobs/uploads/?digest={digest_of(blob)}"
            async with c.session.post(url, data=blob) as r:
                assert r.status == 201, await r.text()
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest_of(b),
                    "size": len(b),
                }
                for b in layers
            ],
        }
        body = json.dumps(doc).encode()
        async with c.session.put(
            f"{first.url}/v2/{repo}/manifests/v1",
            data=body,
            headers={"Content-Type": OCI_MANIFEST},
        ) as r:
            assert r.status == 201, await r.text()
        for h in c.hosts[1:]:
            status, got, _ = await c.get(f"{h.url}/v2/{repo}/manifests/v1")
            assert status == 200 and got == body, h.name
            status, got, _ = await c.get(f"{h.url}/v2/{repo}/manifests/{digest_of(body)}")
            assert status == 200 and got == body
            for blob in (config, *layers):
                status, got, _ = await c.get(f"{h.url}/v2/{repo}/blobs/{digest_of(blob)}")
                assert status == 200 and got == blob, h.name
        assert c.upstream.requests == {}  # sync off: the upstream never heard of anybody
        # and the air-gapped hosts report no upstream bytes (peer bytes are peer bytes)
        for h in c.hosts[1:]:
            async with c.session.get(f"{h.url}/ui/api/overview") as r:
                overview = await r.json()
            assert overview["cache"]["fetched_peers"] > 0
        for h in c.hosts:
            async with c.session.get(f"{h.url}/ui/api/overview") as r:
                overview = await r.json()
            assert {p["url"] for p in overview["peers"]} == {o.url for o in c.hosts}
            assert {s["source"] for s in overview["other_sources"]}.isdisjoint(
                o.url for o in c.hosts
            )


async def test_dead_peers_cost_one_probe_per_backoff_not_a_timeout_per_request(
    tmp_path: Path,
) -> None:
    async with cluster(tmp_path, 3) as c:
        a, _b, dead = c.hosts
        dead.relay.kill()
        data = os.urandom(10_000)
        d = c.upstream.add_blob(data)
        assert await fetch_verified(c, c.blob_url(a, d), data) == data
        # the first request that met the dead host set it aside ...
        down = a.peers.liveness.state(dead.url)
        if down.up:  # it was not in this digest's near hosts: a probe finds it
            c.clock.advance(31)
            await a.peers.probe_due()
        assert not a.peers.liveness.is_up(dead.url)
        failures = a.peers.liveness.state(dead.url).failures
        contacts = dead.relay.connections
        # ... so misses meanwhile never try it
        for _ in range(5):
            blob = os.urandom(5000)
            digest = c.upstream.add_blob(blob)
            assert await fetch_verified(c, c.blob_url(a, digest), blob) == blob
        assert dead.relay.connections == contacts
        # its probe comes when the backoff ends, one per interval, each interval longer
        waits = []
        for _ in range(4):
            state = a.peers.liveness.state(dead.url)
            wait = state.due - c.clock.mono
            waits.append(wait)
            c.clock.advance(wait / 2)
            await a.peers.probe_due()
            assert a.peers.liveness.state(dead.url).failures == failures  # not yet
            c.clock.advance(wait / 2 + 0.01)
            await a.peers.probe_due()
            failures += 1
            assert a.peers.liveness.state(dead.url).failures == failures
        assert waits == sorted(waits) and waits[-1] > waits[0]
        assert waits[-1] <= 30.0  # never more than peers.refresh


async def test_hosts_that_boot_together_find_each_other_within_seconds(tmp_path: Path) -> None:
    async with cluster(tmp_path, 2) as c:
        a, b = c.hosts
        # b was not up yet when a probed it (a host booting): set aside for a short while only
        a.peers.liveness.failed(b.url, "connection refused")
        wait = a.peers.liveness.state(b.url).due - c.clock.mono
        assert 0 < wait <= 1.0
        c.clock.advance(wait)
        await a.peers.probe_due()
        assert a.peers.liveness.is_up(b.url)


async def test_a_home_whose_upstream_fails_is_not_set_aside(tmp_path: Path) -> None:
    """An error status from the home host is an answer (its upstream failed): the home stays
    up for every other key, and this host tries its own upstream."""
    async with cluster(tmp_path, 3) as c:
        home, others = home_of(c, "spectro-images/fake.test/app:broken")
        c.upstream.add_manifest("app", "broken", manifest(b"{}"), OCI_MANIFEST)
        c.upstream.manifest_status = 500
        status, _, _ = await c.get(c.manifest_url(others[0], "broken"))
        assert status == 502
        assert others[0].peers.liveness.is_up(home.url)
        # the home was asked (a fetch request), then this host's own upstream: 2 attempts
        assert c.upstream.count("GET", "/manifests/broken") == 2


async def test_when_the_home_cannot_confirm_a_tag_the_cluster_serves_it_stale(
    tmp_path: Path,
) -> None:
    """The upstream is down: the home tries it once and answers with what it holds, and how old
    that is; the other hosts serve it stale too, without trying the upstream themselves."""
    async with cluster(tmp_path, 3) as c:
        key = "spectro-images/fake.test/app:latest"
        home, others = home_of(c, key)
        body = manifest(b'{"s":1}')
        c.upstream.add_manifest("app", "latest", body, OCI_MANIFEST)
        for h in c.hosts:
            assert (await c.get(c.manifest_url(h, "latest")))[1] == body
        c.clock.advance(61)
        c.upstream.manifest_status = 503
        asked = c.upstream.count("", "/manifests/")
        for h in others:
            status, got, _ = await c.get(c.manifest_url(h, "latest"))
            assert status == 200 and got == body
            assert ("spectro-images/fake.test/app", "latest") in h.registry.stale_served
        # the home tried its upstream (once per request that reached it), nobody else did
        assert 1 <= c.upstream.count("", "/manifests/") - asked <= len(others)
        assert all(h.peers.liveness.is_up(home.url) for h in others)


async def test_the_home_host_does_not_fetch_twice_what_a_peer_had_it_fetch_meanwhile(
    tmp_path: Path,
) -> None:
    """The home host's own request asks the near hosts first; meanwhile a peer's fetch request
    makes the home fetch and store the manifest. The own request then serves what is stored:
    one upstream GET, not two."""
    async with cluster(tmp_path, 3) as c:
        body = manifest(b'{"m":2}')
        d = c.upstream.add_manifest("app", "v2", body, OCI_MANIFEST)
        home, (other, _) = home_of(c, d)
        real = home.registry.from_cluster.manifest
        asked, gate = asyncio.Event(), asyncio.Event()
        calls = 0

        async def slow_first(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            got = await real(*args, **kwargs)
            if calls == 1:  # the own request: nobody had it; now wait while the peer's goes
                asked.set()
                await gate.wait()
            return got

        home.registry.from_cluster.manifest = slow_first  # type: ignore[method-assign]
        own = asyncio.create_task(c.get(c.manifest_url(home, d)))
        await asyncio.wait_for(asked.wait(), 10)
        status, got, _ = await c.get(c.manifest_url(other, d))  # through the home host
        assert status == 200 and got == body
        assert c.upstream.count("", f"/manifests/{d}") == 1
        gate.set()
        status, got, _ = await asyncio.wait_for(own, 10)
        assert status == 200 and got == body
        assert c.upstream.count("", f"/manifests/{d}") == 1
