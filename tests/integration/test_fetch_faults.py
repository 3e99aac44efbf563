"""Pull-through under faults, with an upstream of the tests' own (tests/fakes.py).

regproxy's app runs in this process on a loop of its own (tests/inproc.py, real TCP on
127.0.0.1); the fake upstream runs in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.fakes import BlobFault, FakeUpstream, digest_of
from tests.inproc import AppDaemon, FakeTime

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
def daemon_factory(app_factory: Callable[..., AppDaemon]) -> Callable[..., AppDaemon]:
    return app_factory


def proxy_config(up: FakeUpstream, **extra: object) -> dict[str, object]:
    cfg: dict[str, object] = {
        "upstreams": {
            up.hostport: {
                "url": up.url,
                "alias": "fake.test",
                "read_timeout": "3s",
                "connect_timeout": "2s",
            }
        },
        "tag_ttl": "0s",
    }
    cfg.update(extra)
    return cfg


async def start_daemon(
    factory: Callable[..., AppDaemon], cfg: dict[str, object], **kw: object
) -> AppDaemon:
    # start blocks until the app listens; keep the fake upstream's loop running meanwhile
    return await asyncio.to_thread(factory, cfg, **kw)


def manifest_for(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps(
        {
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
    ).encode()


#: blob sizes for the two ways a body is copied (regproxy.fetch): through the event loop, and
#: on a pump thread from the connection's own socket (plain TCP, at least 1 MiB still to come)
BY_LOOP = 900 * 1024
BY_THREAD = 16 * 1024 * 1024  # 8 chunks in the pump's 3-4 buffers of 2 MiB: each filled twice
COPY_PATHS = pytest.mark.parametrize("size", [BY_LOOP, BY_THREAD], ids=["loop", "thread"])


def copied_by_thread(d: AppDaemon, digest: str) -> bool:
    """Whether the committed transfer's last body was copied by a pump thread."""
    lines = [ln for ln in d.log().splitlines() if "fetch.committed" in ln and digest in ln]
    return bool(lines) and "copy=thread" in lines[-1]


def blobs_on_disk(d: AppDaemon) -> set[str]:
    root = d.root / "store" / "blobs"
    return {p.name for p in root.rglob("*") if p.is_file()}


async def get(
    session: aiohttp.ClientSession, url: str, **kw: object
) -> tuple[int, bytes, dict[str, str]]:
    async with session.get(url, **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.read(), dict(r.headers)


async def test_coalesced_herd_streams_before_the_end(
    upstream: FakeUpstream, daemon_factory
) -> None:
    """16 clients, one missing 8 MiB blob: one upstream GET, identical bytes, and every client
    gets bytes while the upstream still holds back the rest (held at 2 MiB until all 16 did)."""
    data = os.urandom(8 * 1024 * 1024)
    d = upstream.add_blob(data)
    gate = asyncio.Event()
    upstream.blob_faults[d] = BlobFault(hold_at=2 * 1024 * 1024, gate=gate)
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    got_bytes = 0
    all_started = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> bytes:
        nonlocal got_bytes
        buf = bytearray()
        async with session.get(url) as r:
            assert r.status == 200
            assert r.headers["Docker-Content-Digest"] == d
            assert int(r.headers["Content-Length"]) == len(data)
            async for chunk in r.content.iter_any():
                if not buf:
                    assert not gate.is_set(), "bytes only after the upstream sent them all"
                    got_bytes += 1
                    if got_bytes == 16:
                        all_started.set()
                buf += chunk
        return bytes(buf)

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(client(s)) for _ in range(16)]
        # bounded: a client that never sees a byte before the end fails the test here
        await asyncio.wait_for(all_started.wait(), 60)
        gate.set()
        bodies = await asyncio.gather(*tasks)
    assert all(b == data for b in bodies)
    assert upstream.count("GET", f"/blobs/{d}") == 1
    # committed: the next request is a hit from disk, no upstream request
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, url)
    assert status == 200 and body == data
    assert upstream.count("GET", f"/blobs/{d}") == 1


@COPY_PATHS
async def test_cut_mid_blob_is_resumed_with_range(
    upstream: FakeUpstream, daemon_factory, size: int
) -> None:
    data = os.urandom(size + 17)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(cut_at=size // 3, cuts=1)
    # the backoff before each new attempt runs on regproxy's clock: no waiting it out
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=FakeTime().timing)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{d}")
    assert status == 200 and body == data
    ranged = [k for k in upstream.requests if d in k]
    assert upstream.count("GET", d) == 2, ranged  # the first, then one resume
    assert copied_by_thread(proxy, d) == (size == BY_THREAD)


async def test_a_range_answer_that_starts_elsewhere_is_not_appended(
    upstream: FakeUpstream, daemon_factory
) -> None:
    # cut once, then every Range answer starts 1,000 bytes after the byte asked for: appending it
    # would send the client shifted bytes before the digest check cut it; it is refused at once
    data = os.urandom(2 * 1024 * 1024)
    d = upstream.add_blob(data)
    # held at the cut until the client has every byte before it (so they are in the file, and
    # the next source is asked from there, not from byte 0), then cut
    gate = asyncio.Event()
    upstream.blob_faults[d] = BlobFault(
        cut_at=700_000, cuts=1, range_shift=1000, hold_at=700_000, gate=gate
    )
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=FakeTime().timing)
    got = bytearray()
    with contextlib.suppress(aiohttp.ClientPayloadError):  # cut: the clean failure
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{proxy.url}/v2/fake.test/app/blobs/{d}") as r,
        ):
            async for chunk in r.content.iter_any():
                got += chunk
                if len(got) >= 700_000:
                    gate.set()
    # whatever the first response carried is the blob's own bytes: nothing shifted was sent
    assert bytes(got) == data[: len(got)]
    assert "range answer from byte" in proxy.log()
    async with aiohttp.ClientSession() as s:  # the next pull is whole (no cut left)
        status, body, _ = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{d}")
    assert status == 200 and body == data


async def test_cut_without_range_support_restarts_and_skips(
    upstream: FakeUpstream, daemon_factory
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(cut_at=700_000, cuts=1, honor_range=False)
    # the backoff before each new attempt runs on regproxy's clock: no waiting it out
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=FakeTime().timing)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{d}")
    assert status == 200 and body == data


@COPY_PATHS
async def test_cut_for_good_aborts_every_response_and_caches_nothing(
    upstream: FakeUpstream, daemon_factory, size: int
) -> None:
    data = os.urandom(size)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(cut_at=500_000, cuts=100)
    # the backoff before each new attempt runs on regproxy's clock: no waiting it out
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=FakeTime().timing)
    before = blobs_on_disk(proxy)
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"

    async def client(s: aiohttp.ClientSession) -> str:
        try:
            async with s.get(url) as r:
                body = await r.read()
                return f"complete {r.status} {len(body)}"
        except aiohttp.ClientError as exc:
            return f"aborted {type(exc).__name__}"

    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(client(s) for _ in range(4)))
    assert all(r.startswith("aborted") or r.startswith("complete 502") for r in results), results
    assert blobs_on_disk(proxy) == before
    assert not any((proxy.root / "store" / "tmp").iterdir())
    # the next request starts afresh, and now the upstream is healthy
    upstream.blob_faults.pop(d)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, url)
    assert status == 200 and body == data
    assert copied_by_thread(proxy, d) == (size == BY_THREAD)


@COPY_PATHS
async def test_wrong_bytes_are_never_served_complete_nor_cached(
    upstream: FakeUpstream, daemon_factory, size: int
) -> None:
    data = os.urandom(size + 5)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(corrupt=True)
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(url) as r:
                await r.read()
        # a Range inside the blob is held back too: its last byte waits for verification
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(url, headers={"Range": "bytes=0-99"}) as r:
                await r.read()
    assert d.split(":")[1] not in blobs_on_disk(proxy)
    assert "fetch.digest_mismatch" in proxy.log()
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    assert 'kind="digest_mismatch"' in text


async def test_range_on_a_cold_blob_gets_only_the_range(
    upstream: FakeUpstream, daemon_factory
) -> None:
    data = os.urandom(1024 * 1024)
    d = upstream.add_blob(data)
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    async with aiohttp.ClientSession() as s:
        status, body, headers = await get(
            s, f"{proxy.url}/v2/fake.test/app/blobs/{d}", headers={"Range": "bytes=1000-1999"}
        )
    assert status == 206
    assert body == data[1000:2000]
    assert headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"


async def test_stale_tag_served_when_upstream_answers_429_or_503(
    upstream: FakeUpstream, daemon_factory
) -> None:
    cfg = b'{"architecture":"amd64","os":"linux"}'
    layer = os.urandom(1000)
    upstream.add_blob(cfg)
    upstream.add_blob(layer)
    body = manifest_for(cfg, [layer])
    md = upstream.add_manifest("app", "v1", body, OCI_MANIFEST)
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    url = f"{proxy.url}/v2/fake.test/app/manifests/v1"
    async with aiohttp.ClientSession() as s:
        status, got, headers = await get(s, url)
        assert status == 200 and got == body and headers["Docker-Content-Digest"] == md
        for code in (429, 503):
            upstream.manifest_status = code
            status, got, headers = await get(s, url)
            assert status == 200 and got == body, code
        async with s.get(f"{proxy.url}/metrics") as r:
            text = await r.text()
    assert 'regproxy_stale_tags_served_total{upstream="' in text
    assert "tag.stale" in proxy.log()


async def test_tag_recheck_uses_head_and_gets_only_when_moved(
    upstream: FakeUpstream, daemon_factory
) -> None:
    cfg = b'{"architecture":"amd64","os":"linux"}'
    upstream.add_blob(cfg)
    v1 = manifest_for(cfg, [])
    upstream.add_manifest("app", "latest", v1, OCI_MANIFEST)
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    url = f"{proxy.url}/v2/fake.test/app/manifests/latest"
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            _, got, _ = await get(s, url)
            assert got == v1
        assert upstream.count("GET", "/manifests/latest") == 1
        assert upstream.count("HEAD", "/manifests/latest") >= 2
        layer = os.urandom(10)
        upstream.add_blob(layer)
        v2 = manifest_for(cfg, [layer])
        upstream.add_manifest("app", "latest", v2, OCI_MANIFEST)
        _, got, headers = await get(s, url)
        assert got == v2 and headers["Docker-Content-Digest"] == digest_of(v2)


async def test_token_flow_with_expiry(upstream: FakeUpstream, daemon_factory) -> None:
    upstream.token_ttl = 1
    a, b = os.urandom(5000), os.urandom(6000)
    da, db = upstream.add_blob(a), upstream.add_blob(b)
    clock = FakeTime()
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=clock.timing)
    async with aiohttp.ClientSession() as s:
        status, body, _ = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{da}")
        assert status == 200 and body == a
        first = upstream.token_requests
        assert first >= 1
        clock.advance(1.2)  # past the token's lifetime on regproxy's clock
        status, body, _ = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{db}")
        assert status == 200 and body == b
    assert upstream.token_requests > first


async def test_slow_upstream_is_bounded_by_timeouts(upstream: FakeUpstream, daemon_factory) -> None:
    data = os.urandom(512 * 1024)
    d = upstream.add_blob(data)
    silence = asyncio.Event()  # each request: 64 KiB, then nothing until the test ends
    upstream.blob_faults[d] = BlobFault(hold_at=64 * 1024, gate=silence)
    cfg = proxy_config(upstream)
    cfg["upstreams"][upstream.hostport]["read_timeout"] = "100ms"  # type: ignore[index]
    # the backoffs between attempts run on regproxy's clock (the read timeouts on the real one)
    proxy = await start_daemon(daemon_factory, cfg, timing=FakeTime().timing)
    try:
        async with aiohttp.ClientSession() as s:
            # 3 attempts x read_timeout, and then the response is cut (not a stall each)
            with pytest.raises(aiohttp.ClientPayloadError):
                async with s.get(f"{proxy.url}/v2/fake.test/app/blobs/{d}") as r:
                    await r.read()
    finally:
        silence.set()
    assert upstream.count("GET", d) == 3
    assert d.split(":")[1] not in blobs_on_disk(proxy)


async def test_sync_disabled_never_connects(upstream: FakeUpstream, daemon_factory) -> None:
    d = upstream.add_blob(b"x" * 100)
    upstream.add_manifest("app", "v1", manifest_for(b"x" * 100, []), OCI_MANIFEST)
    proxy = await start_daemon(
        daemon_factory, proxy_config(upstream, content={"sync": {"enable": False}})
    )
    async with aiohttp.ClientSession() as s:
        for path in (
            f"/v2/fake.test/app/blobs/{d}",
            "/v2/fake.test/app/manifests/v1",
            f"/v2/app/manifests/v1?ns={upstream.hostport}",
            "/v2/fake.test/app/tags/list",
            "/v2/spectro-images/fake.test/app/manifests/v1",
        ):
            async with s.get(proxy.url + path) as r:
                assert r.status == 404, path
                codes = [e["code"] for e in (await r.json())["errors"]]
                assert codes[0] in ("BLOB_UNKNOWN", "MANIFEST_UNKNOWN", "NAME_UNKNOWN"), path
    assert upstream.connections == 0


async def test_unknown_host_is_name_unknown_and_never_dialled(
    upstream: FakeUpstream, daemon_factory
) -> None:
    proxy = await start_daemon(daemon_factory, proxy_config(upstream))
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{proxy.url}/v2/not-configured.example/app/manifests/v1") as r,
    ):
        assert r.status == 404
        assert (await r.json())["errors"][0]["code"] == "NAME_UNKNOWN"
    assert upstream.connections == 0


async def test_source_that_lied_about_the_size_does_not_fail_the_next_source(
    daemon_factory,
) -> None:
    """A peer sends other bytes of another length for a digest: the transfer goes on from the
    upstream, whose true size must not be refused for differing from the liar's."""
    liar = await FakeUpstream().start()
    good = await FakeUpstream().start()
    try:
        data = os.urandom(800_000)
        d = good.add_blob(data)
        liar.blobs[d] = os.urandom(900_000)  # wrong bytes, and more of them
        liar.blob_faults[d] = BlobFault(delay=0.01)  # a response is tailing it when it lies
        cfg = {
            "upstreams": {good.hostport: {"url": good.url, "alias": "good.test"}},
            "peers": {"urls": [liar.url], "timeout": "1s", "refresh": "60s"},
        }
        proxy = await asyncio.to_thread(daemon_factory, cfg)
        url = f"{proxy.url}/v2/spectro-images/good.test/app/blobs/{d}"
        stored = proxy.root / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
        async with aiohttp.ClientSession() as s:
            try:  # it tailed the liar and carries the liar's length: it is cut, never wrong
                async with s.get(url) as r:
                    assert await r.read() == data
            except aiohttp.ClientPayloadError:
                pass
            # the same transfer goes on from the upstream and commits, with no further request
            deadline = time.monotonic() + 10
            while not stored.exists() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert stored.exists(), proxy.log()
            assert hashlib.sha256(stored.read_bytes()).hexdigest() == d[7:]
            assert good.count("GET", d) == 1
            async with s.get(url) as r:
                assert r.status == 200
                assert await r.read() == data
    finally:
        await liar.stop()
        await good.stop()


async def pull_past_a_peer_that_cuts(
    daemon_factory, data: bytes, lie: bytes, cut_at: int, **fault: object
) -> tuple[AppDaemon, FakeUpstream, str, list[bytes | None]]:
    """A peer holds ``lie`` for the digest of ``data`` and cuts its body at ``cut_at``; the
    upstream holds ``data``. Two pulls: each body whole (and exact) or None (cut)."""
    liar = await FakeUpstream().start()
    good = await FakeUpstream().start()
    try:
        d = good.add_blob(data)
        liar.blobs[d] = lie
        # held at the cut until the first client has the bytes before it (so they are in the
        # file when the cut comes: aiohttp may raise a cut before handing over what it buffered)
        gate = asyncio.Event()
        liar.blob_faults[d] = BlobFault(
            cut_at=cut_at,
            cuts=1,
            hold_at=cut_at,
            gate=gate,
            **fault,  # type: ignore[arg-type]
        )
        cfg = {
            "upstreams": {good.hostport: {"url": good.url, "alias": "good.test"}},
            "peers": {"urls": [liar.url], "timeout": "1s", "refresh": "60s"},
        }
        proxy = await asyncio.to_thread(daemon_factory, cfg)
        url = f"{proxy.url}/v2/spectro-images/good.test/app/blobs/{d}"
        bodies: list[bytes | None] = []
        served_while_held = False
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                body = bytearray()
                try:
                    async with s.get(url) as r:
                        assert r.status == 200
                        async for chunk in r.content.iter_any():
                            body += chunk
                            if len(body) >= cut_at and not gate.is_set():
                                gate.set()  # every byte the peer sent before it stalled
                                served_while_held = True
                        bodies.append(bytes(body))
                except aiohttp.ClientPayloadError:
                    bodies.append(None)
                finally:
                    gate.set()
        assert all(b is None or b == data for b in bodies)  # never complete and wrong
        # the bytes the peer sent before it stalled went out while it stalled (the peer then
        # cut: set aside for its cut, not for a read timeout that waited for its next chunk)
        assert served_while_held
        failed = [line for line in proxy.log().splitlines() if "fetch.source_failed" in line]
        assert failed and not any("timed out" in line for line in failed), failed
        assert liar.count("GET", d) == 1  # set aside when it cut: not asked again
        return proxy, good, d, bodies
    finally:
        await liar.stop()
        await good.stop()


async def switches(proxy: AppDaemon) -> dict[tuple[str, str], float]:
    """regproxy_fetch_switches_total by (kind, how) (the exposition sorts the labels)."""
    async with aiohttp.ClientSession() as s, s.get(f"{proxy.url}/metrics") as r:
        text = await r.text()
    out = {}
    for how, kind, n in re.findall(
        r'^regproxy_fetch_switches_total\{how="(\w+)",kind="(\w+)"\} (\S+)$', text, re.M
    ):
        out[(kind, how)] = float(n)
    return out


@COPY_PATHS
async def test_a_peer_that_cut_wrong_bytes_is_continued_then_started_over_whole(
    daemon_factory, size: int
) -> None:
    """A peer sends 3/4 of the blob with a byte flipped and cuts: the upstream continues with
    a Range request; the file of both does not match, blames neither, and starts over, whole,
    from the upstream. The response that tailed it is cut; the next one is exact."""
    data = os.urandom(size)
    proxy, good, d, bodies = await pull_past_a_peer_that_cuts(
        daemon_factory, data, data, size * 3 // 4, corrupt=True
    )
    assert bodies[0] is None and bodies[1] == data
    assert good.count("GET", d) == 2  # the continuation, then the whole blob
    assert "fetch.mixed_mismatch" in proxy.log()
    got = await switches(proxy)
    assert got[("peer", "continued")] == 1 and got[("upstream", "restarted")] == 1


async def test_a_peer_that_cut_a_blob_of_another_size_is_started_over_from_the_upstream(
    daemon_factory,
) -> None:
    """The peer's bytes have another length: the upstream's size holds, from byte 0."""
    data = os.urandom(800_000)
    proxy, good, d, bodies = await pull_past_a_peer_that_cuts(
        daemon_factory, data, os.urandom(900_000), 400_000
    )
    assert bodies[0] is None and bodies[1] == data  # the first carried the liar's length
    assert good.count("GET", d) == 2  # asked from 400000, then from 0
    assert "fetch.size_differs" in proxy.log()
    stored = proxy.root / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
    assert stored.read_bytes() == data


async def test_empty_body_for_a_digest_is_not_answered_before_verification(
    daemon_factory,
) -> None:
    """An upstream answers a blob with an empty 200: with no last byte to hold back, the
    response must wait for the digest check instead of ending complete and wrong at once."""
    up = await FakeUpstream().start()
    try:
        d = "sha256:" + hashlib.sha256(b"not empty").hexdigest()
        up.blobs[d] = b""
        cfg = {"upstreams": {up.hostport: {"url": up.url, "alias": "fake.test"}}}
        proxy = await asyncio.to_thread(daemon_factory, cfg)
        url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            body = await r.read()
            assert r.status != 200, (r.status, body)
            assert r.status == 502
        stored = proxy.root / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
        assert not stored.exists()
    finally:
        await up.stop()


@pytest.mark.parametrize("status", [429, 503])
async def test_a_blob_the_upstream_defers_is_an_oci_error_then_fetched_after_retry_after(
    upstream: FakeUpstream, daemon_factory, status: int
) -> None:
    """429/503 with Retry-After for a blob: the client gets an OCI error (never a 500 of ours
    nor a partial body), nothing is stored, and no request goes upstream before the Retry-After
    passed on regproxy's clock; then the blob comes through."""
    data = os.urandom(70_000)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(status=status, statuses=1, retry_after="30")
    clock = FakeTime()
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=clock.timing)
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    async with aiohttp.ClientSession() as s:
        got, body, _ = await get(s, url)
        assert got in (429, 502, 503), (got, body)
        assert json.loads(body)["errors"][0]["code"]
        assert d.split(":")[1] not in blobs_on_disk(proxy)
        got, _, _ = await get(s, url)  # still within Retry-After: the upstream is not asked
        assert got in (429, 502, 503) and upstream.count("GET", f"/blobs/{d}") == 1
        clock.advance(31)  # past the Retry-After the upstream asked for
        got, body, headers = await get(s, url)
    assert got == 200 and body == data and headers["Docker-Content-Digest"] == d
    assert upstream.count("GET", f"/blobs/{d}") == 2


async def test_a_blob_answered_500_is_retried_within_the_fetch(
    upstream: FakeUpstream, daemon_factory
) -> None:
    """A 500 is worth another try: the client gets the blob from the same request (the backoff
    runs on regproxy's clock, so the test does not wait it out)."""
    data = os.urandom(70_000)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(status=500, statuses=1)
    clock = FakeTime()
    proxy = await start_daemon(daemon_factory, proxy_config(upstream), timing=clock.timing)
    async with aiohttp.ClientSession() as s:
        got, body, headers = await get(s, f"{proxy.url}/v2/fake.test/app/blobs/{d}")
    assert got == 200 and body == data and headers["Docker-Content-Digest"] == d
    assert upstream.count("GET", f"/blobs/{d}") == 2
