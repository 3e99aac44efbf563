"""A home host that dies or freezes half-way through a blob (regproxy.cluster, regproxy.fetch).

Two regproxy daemons on loopback, A and H, and a small upstream of the tests' own in this
process. A's client misses a blob whose home host is H: A asks H (a fetch request), H fetches it
from the upstream, which holds H's transfer after 3 MiB of 8; A streams what H sent to its
client. Then H is killed (SIGKILL) or frozen (SIGSTOP), and the upstream lets the rest go.

What must hold: A's client gets the whole blob, exact (A continues from its own upstream with a
Range request at the bytes in hand), or a clean cut before the last byte when nothing can
continue it; never a complete response with wrong bytes, never a hang; the next pull is
served; nothing half-written stays in A's store; H is set aside (not asked again for the blob,
not retried), and A's log and metrics say what happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from regproxy.rendezvous import order
from tests.fakes import BlobFault, FakeUpstream, digest_of
from tests.peers import Daemon, free_port

pytestmark = pytest.mark.process

SIZE = 8 * 1024 * 1024
HELD_AT = 3 * 1024 * 1024


@dataclass
class Drill:
    up: FakeUpstream
    a: Daemon
    h: Daemon
    session: aiohttp.ClientSession
    data: bytes
    digest: str
    fault: BlobFault
    gate: asyncio.Event

    @property
    def url(self) -> str:
        return f"{self.a.url}/v2/fake.test/team/app/blobs/{self.digest}"

    async def pull_while(self, fail_home: Callable[[], None]) -> bytes | None:
        """A's client pulls the blob; once 1 MiB of it came (from H), ``fail_home()`` and let
        the upstream send the rest. The whole body, or None when it was cut (clean)."""
        async with self.session.get(self.url) as r:
            assert r.status == 200, await r.text()
            assert r.content_length == SIZE
            head = await asyncio.wait_for(r.content.readexactly(1024 * 1024), 30)
            assert self.fault.holding.is_set()  # H's transfer is held half-way
            fail_home()
            self.gate.set()
            try:
                body = head + await asyncio.wait_for(r.content.read(), 60)
            except aiohttp.ClientPayloadError:
                return None  # cut before its last byte (Content-Length not met)
        assert hashlib.sha256(body).hexdigest() == self.digest[7:]  # a whole body is exact
        return body

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(f"{self.a.url}/metrics") as r:
            text = await r.text()
        found = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                found += float(line.rsplit(" ", 1)[1])
        return found

    async def h_state(self) -> str:
        async with self.session.get(f"{self.a.url}/readyz") as r:
            peers = json.loads(await r.read())["peers"]
        return str(next(p["state"] for p in peers if p["url"] == self.h.url))

    def stored(self) -> bool:
        blob = self.a.root / "store" / "blobs" / "sha256" / self.digest[7:9] / self.digest[7:]
        return blob.is_file() and hashlib.sha256(blob.read_bytes()).hexdigest() == self.digest[7:]

    def half_written(self) -> list[Path]:
        return [p for p in (self.a.root / "store" / "tmp").rglob("*") if p.is_file()]

    def a_lines(self, event: str) -> list[str]:
        return [ln for ln in self.a.log().splitlines() if f" {event} " in ln and self.digest in ln]


@asynccontextmanager
async def drill(daemon_factory: Callable[..., Daemon]) -> AsyncIterator[Drill]:
    up = await FakeUpstream().start()
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    a, h = (
        daemon_factory(
            {
                "upstreams": {
                    up.hostport: {
                        "url": up.url,
                        "alias": "fake.test",
                        "read_timeout": "3s",
                        "connect_timeout": "1s",
                    }
                },
                "peers": {"urls": urls, "timeout": "1s", "refresh": "10s"},
            },
            start=False,
            name=name,
        )
        for name in "AH"
    )
    a.port, h.port = ports
    gate = asyncio.Event()
    try:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(h.start))
        while True:  # a blob whose home host is H
            data = os.urandom(SIZE)
            digest = digest_of(data)
            if order(urls, digest)[0] == h.url:
                break
        up.add_blob(data)
        fault = up.blob_faults[digest] = BlobFault(hold_at=HELD_AT, gate=gate)
        timeout = aiohttp.ClientTimeout(total=90)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            d = Drill(up, a, h, session, data, digest, fault, gate)
            for _ in range(200):  # until A sees H up (bounded: 20 s)
                if await d.h_state() == "up":
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("A never saw H up")
            yield d
    finally:
        gate.set()
        if h.proc is not None and h.proc.poll() is None:
            h.proc.send_signal(signal.SIGCONT)  # a frozen H must hear its SIGTERM
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(h.stop))
        await up.stop()


async def assert_h_set_aside_once(d: Drill) -> None:
    """H is down in A's list, was asked once for the blob (no retry of a set-aside peer),
    and A's log and metrics name it."""
    assert await d.h_state() == "down"
    failed = [ln for ln in d.a_lines("fetch.source_failed") if f"source={d.h.url} " in ln]
    assert len(failed) == 1 and "kind=home" in failed[0], failed
    assert not [ln for ln in d.a_lines("fetch.resume") if d.h.url in ln]
    assert re.search(rf"peers\.failed url={d.h.url} what=GET \S+@{d.digest} body", d.a.log())
    assert await d.metric("regproxy_peer_errors_total", peer=d.h.url) >= 1


async def test_home_host_killed_mid_blob_the_client_gets_the_whole_blob(daemon_factory) -> None:
    async with drill(daemon_factory) as d:
        body = await d.pull_while(d.h.kill)
        assert body == d.data  # continued from A's upstream, not cut
        assert await d.metric("regproxy_fetch_switches_total", kind="home", how="continued") == 1
        (line,) = d.a_lines("fetch.continue")
        assert f"source={d.h.url} next={d.up.hostport} next_kind=upstream" in line
        await assert_h_set_aside_once(d)
        assert d.stored() and d.half_written() == []
        gets = d.up.count("GET", f"/blobs/{d.digest}")
        assert gets == 2  # H's, and A's continuation
        async with d.session.get(d.url) as r:  # the next pull: from A's store
            assert r.status == 200 and await r.read() == d.data
        assert d.up.count("GET", f"/blobs/{d.digest}") == gets
        assert len(d.a_lines("fetch.committed")) == 1
        # the next digest whose home was H does not wait on it: H is set aside, A fetches
        while True:
            other = os.urandom(50_000)
            d2 = digest_of(other)
            if order([d.a.url, d.h.url], d2)[0] == d.h.url:
                break
        d.up.add_blob(other)
        async with d.session.get(d.url.replace(d.digest, d2)) as r:
            assert r.status == 200 and await r.read() == other
        assert not [ln for ln in d.a.log().splitlines() if d2 in ln and d.h.url in ln]


async def test_home_host_killed_and_the_upstream_failing_the_client_is_cut_cleanly(
    daemon_factory,
) -> None:
    async with drill(daemon_factory) as d:

        def kill_and_fail_upstream() -> None:
            d.h.kill()
            d.fault.status, d.fault.statuses = 503, 1000  # A's continuation gets 503s

        assert await d.pull_while(kill_and_fail_upstream) is None  # cut, never short-complete
        assert not d.stored() and d.half_written() == []
        await assert_h_set_aside_once(d)
        d.fault.statuses = 0  # the upstream is back: the next pull is served, whole
        async with d.session.get(d.url) as r:
            assert r.status == 200 and await r.read() == d.data
        assert d.stored() and d.half_written() == []


async def test_home_host_frozen_mid_blob_is_given_up_after_one_read_timeout(
    daemon_factory,
) -> None:
    """H stops sending (SIGSTOP: its sockets stay open, nothing answers): A gives up on it
    after its read timeout for peers (10 s), once, and continues from its upstream."""
    async with drill(daemon_factory) as d:
        assert d.h.proc is not None
        proc = d.h.proc
        body = await d.pull_while(lambda: proc.send_signal(signal.SIGSTOP))
        assert body == d.data
        assert await d.metric("regproxy_fetch_switches_total", kind="home", how="continued") == 1
        (failed,) = d.a_lines("fetch.source_failed")
        assert "timed out" in failed
        await assert_h_set_aside_once(d)
        assert d.stored() and d.half_written() == []
