"""Regressions found in review, against a real daemon (a small fake only for the faults)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import aiohttp

from tests.fakes import BlobFault, FakeUpstream


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
