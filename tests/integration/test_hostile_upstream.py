"""Upstreams that misbehave on purpose: what they can and cannot make regproxy do.

regproxy runs in process (``create_app`` behind aiohttp's test server on 127.0.0.1); the upstream
is the tests' own fault server (tests/fakes.py) on port 0, where docker-registry cannot play the
fault. Nothing here sleeps to pass a deadline: deadlines are configured small, or the clock is
injected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.async_index import READERS
from regproxy.config import config_from_dict
from regproxy.deadline import Timing, TransferLimits
from regproxy.errors import OCIError
from regproxy.fetch import Fetcher, Source
from regproxy.index import Index
from regproxy.metrics import Metrics
from regproxy.names import RepoName
from regproxy.oci import Digest
from regproxy.proxy import ProxyRegistry
from regproxy.store import Store
from regproxy.web_keys import REGISTRY_KEY, RESOLVER_KEY
from tests.fakes import BlobFault, FakeUpstream, digest_of

# api keeps per-request facts under plain string keys (request["error"]), as test_auth says
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
ALIAS = "fake.test"


@pytest.fixture
async def canary() -> AsyncIterator[FakeUpstream]:
    """An internal service nobody may reach through regproxy: it counts TCP connections."""
    up = await FakeUpstream().start()
    yield up
    await up.stop()


@contextlib.asynccontextmanager
async def proxy(
    root: Path,
    up: FakeUpstream,
    metrics: Metrics | None = None,
    *,
    timing: Timing | None = None,
    **settings: Any,
) -> AsyncIterator[TestClient[Any, Any]]:
    raw: dict[str, Any] = {
        "storage": {"root": str(root)},
        "log": {"access": False},
        "tag_ttl": "0s",
        "upstreams": {up.hostport: {"url": up.url, "alias": ALIAS, **settings}},
    }
    client: TestClient[Any, Any] = TestClient(
        TestServer(
            create_app(config_from_dict(raw), metrics=metrics, timing=timing or Timing()),
            host="127.0.0.1",
        )
    )
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


def errors(metrics: Metrics, source: str, kind: str) -> float:
    value = metrics.registry.get_sample_value(
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
    m = Metrics()
    async with proxy(tmp_path / "store", upstream, m) as client:
        for target in targets:
            upstream.blob_redirects[d] = target
            for method in ("GET", "HEAD"):
                resp = await client.request(method, f"/v2/{ALIAS}/app/blobs/{d}")
                body = await resp.read()
                assert resp.status in (404, 502), (target, method, resp.status)
                assert data[:100] not in body
    assert canary.connections == 0
    assert errors(m, upstream.hostport, "denied") >= len(targets)
    assert "upstream.refused" in caplog.text


@pytest.mark.parametrize(
    "location",
    [
        "javascript:alert(1)",  # no host: not a URL anything can be fetched from
        "http://" + "a" * 300 + "/x",  # a label no IDNA encodes (getaddrinfo: UnicodeError)
        "http://xn--/x",  # an A-label that does not decode
    ],
    ids=["no-host", "long-label", "bad-a-label"],
)
async def test_a_redirect_to_an_unusable_location_is_the_upstreams_error(
    tmp_path: Path, upstream: FakeUpstream, location: str
) -> None:
    data = os.urandom(1000)
    d = upstream.add_blob(data)
    upstream.blob_redirects[d] = location
    # the backoffs between the attempts run on a clock of the test's (FakeTime below)
    async with proxy(tmp_path / "store", upstream, timing=FakeTime().timing()) as client:
        for method in ("GET", "HEAD"):
            resp = await client.request(method, f"/v2/{ALIAS}/app/blobs/{d}")
            assert resp.status in (404, 502), (method, resp.status, await resp.text())
        upstream.blob_redirects.clear()  # the upstream mends: the next GET is served
        resp = await client.get(f"/v2/{ALIAS}/app/blobs/{d}")
        assert resp.status == 200 and await resp.read() == data


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


# --- deadlines, backoff, the connection queue -------------------------------------------------------
async def read_or_cut(client: TestClient[Any, Any], method: str, path: str) -> tuple[int, bytes]:
    """Status and body; a response cut mid-body (the transfer failed) is status -1."""
    try:
        resp = await client.request(method, path)
        return resp.status, await resp.read()
    except aiohttp.ClientPayloadError:
        return -1, b""


@pytest.mark.parametrize(
    "size",
    [4000, 4 * 1024 * 1024],  # copied through the loop; by a pump thread (regproxy.pump)
    ids=["loop", "thread"],
)
async def test_dripping_upstream_is_dropped_and_the_next_get_starts_afresh(
    tmp_path: Path, upstream: FakeUpstream, size: int, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, logger="regproxy.fetch")
    data = os.urandom(size)
    d = upstream.add_blob(data)
    upstream.blob_faults[d] = BlobFault(step=1, delay=0.2)  # 5 bytes a second
    settings = {"min_rate": "1KiB/s", "min_rate_window": "250ms"}
    m = Metrics()
    async with proxy(tmp_path / "store", upstream, m, **settings) as client:
        path = f"/v2/{ALIAS}/app/blobs/{d}"
        status, body = await read_or_cut(client, "GET", path)
        assert status in (-1, 502, 504) and body != data
        # a stall is not resumed within the fetch: one upstream GET, and the entry is gone
        assert upstream.count("GET", f"/blobs/{d}") == 1
        assert errors(m, upstream.hostport, "slow") >= 1
        # the upstream recovers, at a pace that leaves the body on the socket when the
        # headers are read (at full speed the client may have read all but the last MiB
        # already, and the body then stays on the loop: copy=loop, in ~1 of 16 runs)
        upstream.blob_faults[d] = BlobFault(delay=0.002)
        status, body = await read_or_cut(client, "GET", path)
        assert status == 200 and body == data
        assert upstream.count("GET", f"/blobs/{d}") == 2
    committed = [r.getMessage() for r in caplog.records if "fetch.committed" in r.getMessage()]
    assert committed and ("copy=thread" in committed[-1]) == (size > 1024 * 1024)


async def test_200_concurrent_cold_pulls_queue_for_16_connections(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    blobs = [os.urandom(32 * 1024) for _ in range(200)]
    digests = [upstream.add_blob(b) for b in blobs]
    for d in digests:  # each transfer takes a while: the queue is what lets all 200 through
        upstream.blob_faults[d] = BlobFault(step=8 * 1024, delay=0.02)
    # a connect timeout far shorter than the wait for a free connection
    settings = {"connect_timeout": "0.5s", "max_connections": 16}
    m = Metrics()
    async with proxy(tmp_path / "store", upstream, m, **settings) as client:
        results = await asyncio.gather(
            *(read_or_cut(client, "GET", f"/v2/{ALIAS}/app/blobs/{d}") for d in digests)
        )
    assert [s for s, _ in results] == [200] * 200
    assert all(body == blob for (_, body), blob in zip(results, blobs, strict=True))
    assert upstream.connections <= 16
    waited = m.registry.get_sample_value(
        "regproxy_upstream_queue_wait_seconds_count", {"upstream": upstream.hostport}
    )
    assert waited is not None and waited > 0


# --- the fetcher on an injected clock (no waiting for deadlines or backoffs) ------------------------
@dataclass
class FakeTime:
    """A clock that only moves when told; sleeps are recorded and move it."""

    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def timing(self) -> Timing:
        return Timing(now=lambda: self.now, sleep=self.sleep, random=lambda: 0.5)


@dataclass
class Chunks:
    """A blob body from a fake source: each chunk moves the clock by ``tick`` seconds."""

    size: int
    parts: list[bytes]
    clock: FakeTime
    tick: float = 0.0
    offset: int = 0
    source: str = "fake"

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            self.clock.now += self.tick
            yield part

    async def close(self) -> None:
        return None


async def fetch_with(tmp_path: Path, time: FakeTime, sources: list[Source], digest: Digest) -> str:
    store = Store(tmp_path / "store")
    store.open()
    committed: list[str] = []

    async def on_commit(d: Digest, size: int, repo: str, source: str) -> None:
        committed.append(source)

    fetcher = Fetcher(store, on_commit, timing=time.timing())
    transfer = fetcher.start(digest, sources, "spectro-images/fake.test/app")
    try:
        await transfer.wait_done()
    finally:
        await fetcher.drain(5)
    return committed[0]


async def test_a_stalled_source_is_dropped_for_the_next_on_the_clock(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    digest = Digest.parse(digest_of(data))
    time = FakeTime()
    limits = TransferLimits(min_rate=1024, window=60, max_time=3600)
    opened: list[str] = []

    def source(name: str, stream: Callable[[int], Chunks]) -> Source:
        async def open_(d: Digest, offset: int) -> Chunks:
            opened.append(name)
            return stream(offset)

        return Source(name, "upstream", open_, limits=limits)

    # 64 bytes a minute (one byte a second of clock), far below 1 KiB/s over 60 s
    drip = source(
        "drip",
        lambda off: Chunks(len(data), [data[i : i + 1] for i in range(off, len(data))], time, 1.0),
    )
    good = source("good", lambda off: Chunks(len(data), [data], time))
    got = await fetch_with(tmp_path, time, [drip, good], digest)
    assert got == "fake"
    assert opened == ["drip", "good"]  # a stall is not retried within the fetch
    assert time.slept == []  # and no backoff was waited for it
    assert 60 <= time.now - 1000.0 < 70  # dropped once the window showed the shortfall


async def test_cut_transfers_back_off_between_attempts(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    digest = Digest.parse(digest_of(data))
    time = FakeTime()
    attempts: list[int] = []

    async def open_(d: Digest, offset: int) -> Chunks:
        attempts.append(offset)
        # the first two answers are cut after 1000 bytes: a cut is resumed with a Range
        end = len(data) if len(attempts) > 2 else offset + 1000
        return Chunks(len(data), [data[offset:end]], time, offset=offset)

    got = await fetch_with(tmp_path, time, [Source("cutting", "upstream", open_)], digest)
    assert got == "fake"
    assert attempts == [0, 1000, 2000]
    # no back-to-back retries: exponential, half fixed and half jittered (jitter pinned at 0.5)
    assert time.slept == [pytest.approx(0.375), pytest.approx(0.75)]


async def test_shutdown_drains_within_the_timeout_and_cuts_the_rest(
    tmp_path: Path, caplog: Any
) -> None:
    data = os.urandom(1000)
    digest = Digest.parse(digest_of(data))
    store = Store(tmp_path / "store")
    store.open()
    never = asyncio.Event()

    async def hang(d: Digest, offset: int) -> Chunks:
        await never.wait()  # an upstream that never answers
        raise AssertionError("unreachable")

    async def on_commit(d: Digest, size: int, repo: str, source: str) -> None:
        raise AssertionError("nothing commits")

    fetcher = Fetcher(store, on_commit)
    transfer = fetcher.start(digest, [Source("hung", "upstream", hang)], "spectro-images/x/app")
    await fetcher.drain(0.05)
    with pytest.raises(OCIError):
        await transfer.wait_done()
    assert fetcher.inflight == {}
    assert "shutdown.transfers finished=0 cut=1" in caplog.text
    assert not any((tmp_path / "store" / "tmp").iterdir())


async def test_a_pump_thread_cut_at_shutdown_lets_go_of_its_file(
    tmp_path: Path, upstream: FakeUpstream, caplog: Any
) -> None:
    """A plain-TCP body copied by a pump thread (regproxy.pump), cut by the shutdown drain: the
    thread stops, the temp file goes, the client's response is cut."""
    data = os.urandom(8 * 1024 * 1024)
    d = upstream.add_blob(data)
    rest = asyncio.Event()  # 3 MiB come, then nothing until the test is over
    upstream.blob_faults[d] = BlobFault(hold_at=3 * 1024 * 1024, gate=rest)
    try:
        async with proxy(tmp_path / "store", upstream) as client:
            fetcher = registry_of(client).fetcher
            pull = asyncio.create_task(read_or_cut(client, "GET", f"/v2/{ALIAS}/app/blobs/{d}"))
            async with asyncio.timeout(30):
                while not (t := fetcher.get(Digest.parse(d))) or t.written < 2 * 1024 * 1024:
                    await asyncio.sleep(0.01)
            assert t.copy == "thread"
            await asyncio.wait_for(fetcher.drain(0), 30)
            status, body = await asyncio.wait_for(pull, 30)
            assert status == -1 and body != data  # cut, never complete
            assert fetcher.inflight == {}
            assert "shutdown.transfers finished=0 cut=1" in caplog.text
            assert not any((tmp_path / "store" / "tmp").iterdir())
    finally:
        rest.set()


# --- bounded memory: tags lists and manifest nesting ------------------------------------------------
def registry_of(client: TestClient[Any, Any]) -> ProxyRegistry:
    registry = client.server.app[REGISTRY_KEY]
    assert isinstance(registry, ProxyRegistry)
    return registry


def repo_of(client: TestClient[Any, Any], path: str) -> RepoName:
    return client.server.app[RESOLVER_KEY].resolve(f"{ALIAS}/{path}")


async def index_settled(registry: ProxyRegistry) -> None:
    """Every index call queued before this one has finished, and its caller has moved on:
    the reader threads all meet at a barrier, then the writer answers."""
    barrier = threading.Barrier(READERS, timeout=30)
    await asyncio.gather(*(registry.db.read(lambda ix: barrier.wait()) for _ in range(READERS)))
    await registry.db.write(lambda ix: None)
    for _ in range(3):
        await asyncio.sleep(0)


async def test_tags_from_a_hostile_upstream_stay_bounded(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    asked: list[dict[str, str]] = []

    async def huge(request: web.Request, repo: str) -> web.StreamResponse:
        asked.append(dict(request.query))
        # 3 MB of tags on every page, and always a next page
        tags = [f"t{i:07d}" for i in range(300_000)]
        link = f'</v2/{repo}/tags/list?page={len(asked)}>; rel="next"'
        return web.json_response({"name": repo, "tags": tags}, headers={"Link": link})

    upstream.tags_handler = huge
    async with proxy(tmp_path / "store", upstream) as client:
        resp = await client.get(f"/v2/{ALIAS}/app/tags/list")
        assert resp.status == 502
        assert (await resp.json())["errors"][0]["code"] == "UNKNOWN"
    assert len(asked) == 1  # the first page was over 1 MiB: nothing more was asked or kept


async def test_tags_pages_are_passed_through_merged_and_coalesced(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    asked: list[dict[str, str]] = []
    gate = asyncio.Event()

    async def endless(request: web.Request, repo: str) -> web.StreamResponse:
        asked.append(dict(request.query))
        await gate.wait()
        page = int(request.query.get("page", "0"))
        tags = [f"p{page:04d}-{i:04d}" for i in range(1000)]  # honest pages, but no end
        link = f'</v2/{repo}/tags/list?page={page + 1}>; rel="next"'
        return web.json_response({"name": repo, "tags": tags}, headers={"Link": link})

    upstream.tags_handler = endless
    async with proxy(tmp_path / "store", upstream) as client:
        # identical requests in flight at once: one upstream request
        registry = registry_of(client)
        repo = repo_of(client, "app")
        calls = [asyncio.create_task(registry.list_tags(repo, 6, None)) for _ in range(5)]
        await index_settled(registry)  # every call is past its index lookups
        gate.set()
        answers = await asyncio.gather(*calls)
        assert all(a == [f"p0000-{i:04d}" for i in range(6)] for a in answers)
        assert len(asked) == 1 and asked[0]["n"] == "6"
        # n and last from the client go upstream; the answer is paged with Link
        resp = await client.get(
            f"/v2/{ALIAS}/app/tags/list", params={"n": "3", "last": "p0000-0004"}
        )
        assert (await resp.json())["tags"] == ["p0000-0005", "p0000-0006", "p0000-0007"]
        assert "last=p0000-0007" in resp.headers["Link"]
        assert asked[-1] == {"n": "4", "last": "p0000-0004"}
        # no n: at most 10,000 tags, a Link for the rest, and a bounded number of pages
        before = len(asked)
        resp = await client.get(f"/v2/{ALIAS}/app/tags/list")
        tags = (await resp.json())["tags"]
        assert len(tags) == 10_000 and tags == sorted(tags)
        assert "Link" in resp.headers
        assert len(asked) - before == 11


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DEEP = (
    b'{"schemaVersion":2,"mediaType":"'
    + OCI_MANIFEST.encode()
    + b'","config":'
    + b"[" * 100_000
    + b"]" * 100_000
    + b',"layers":[]}'
)


async def test_a_manifest_nested_100000_deep_is_refused_not_a_500(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    digest = upstream.add_manifest("app", "deep", DEEP, OCI_MANIFEST)
    async with proxy(tmp_path / "store", upstream) as client:
        resp = await client.put(
            "/v2/spectro-images/mine/manifests/deep",
            data=DEEP,
            headers={"Content-Type": OCI_MANIFEST},
        )
        assert resp.status == 400
        assert (await resp.json())["errors"][0]["code"] == "MANIFEST_INVALID"
        for ref in ("deep", digest):
            resp = await client.get(f"/v2/{ALIAS}/app/manifests/{ref}")
            assert resp.status == 502, ref
            assert (await resp.json())["errors"][0]["code"] == "UNKNOWN"


@pytest.mark.parametrize(
    "headers",
    [
        {"Age": "\u00b2"},  # a superscript two: str.isdigit() says yes, int() and float() no
        {"ratelimit-remaining": "\u00b2"},
        {"ratelimit-remaining": "9" * 5000},  # int() refuses more than 4,300 digits
        {"ratelimit-remaining": "9" * 400},  # an int, but too large for a float (the gauge)
        {"ratelimit-remaining": "5", "ratelimit-limit": "9" * 5000},
    ],
    ids=["age-superscript", "remaining-superscript", "remaining-5000", "remaining-400", "limit"],
)
async def test_absurd_number_headers_from_upstream_are_not_believed(
    tmp_path: Path, upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    config = upstream.add_blob(b"{}")
    body = (
        b'{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"a/b","digest":"%s",'
        b'"size":2},"layers":[]}' % (OCI_MANIFEST.encode(), config.encode())
    )
    upstream.add_manifest("app", "v1", body, OCI_MANIFEST)
    upstream.manifest_headers = headers
    async with proxy(tmp_path / "store", upstream) as client:
        for method in ("GET", "HEAD", "GET"):  # a fetch, then tag checks (tag_ttl 0)
            resp = await client.request(
                method, f"/v2/{ALIAS}/app/manifests/v1", headers={"Accept": OCI_MANIFEST}
            )
            assert resp.status == 200, (method, await resp.text())
        assert await resp.read() == body
        # an upstream that refuses with a Retry-After nobody can read: the tag is served stale
        upstream.manifest_status = 429
        upstream.manifest_headers = {"Retry-After": "\u00b2", **headers}
        resp = await client.get(f"/v2/{ALIAS}/app/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert resp.status == 200 and await resp.read() == body


# --- HEAD, detached manifest fills, misses ----------------------------------------------------------
def on_disk(root: Path, digest: str) -> bool:
    return any(p.name == digest.split(":")[1] for p in (root / "blobs").rglob("*"))


async def test_head_on_a_missing_blob_is_a_head_upstream(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    data = os.urandom(300_000)
    d = upstream.add_blob(data)
    async with proxy(tmp_path / "store", upstream) as client:
        resp = await client.head(f"/v2/{ALIAS}/app/blobs/{d}")
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Docker-Content-Digest"] == d
        resp = await client.head(f"/v2/{ALIAS}/app/blobs/{digest_of(b'not there')}")
        assert resp.status == 404
    assert upstream.count("HEAD", f"/blobs/{d}") == 1
    assert upstream.count("GET", "/blobs/") == 0  # nothing was downloaded
    assert not on_disk(tmp_path / "store", d)


async def test_cancelling_the_first_manifest_requester_fails_nobody_else(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = b'{"architecture":"amd64","os":"linux"}'
    upstream.add_blob(config)
    body = (
        b'{"schemaVersion":2,"mediaType":"' + OCI_MANIFEST.encode() + b'","config":'
        b'{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"'
        + digest_of(config).encode()
        + b'","size":'
        + str(len(config)).encode()
        + b'},"layers":[]}'
    )
    upstream.add_manifest("app", "v1", body, OCI_MANIFEST)
    upstream.manifest_gate = asyncio.Event()
    async with proxy(tmp_path / "store", upstream) as client:
        registry = registry_of(client)
        repo = repo_of(client, "app")
        first = asyncio.create_task(registry.get_manifest(repo, "v1"))
        await upstream.manifest_arrived.wait()
        second = asyncio.create_task(registry.get_manifest(repo, "v1"))
        await index_settled(registry)  # the second is past its local lookup
        first.cancel()
        upstream.manifest_gate.set()
        got = await second
        assert got.body == body
        with pytest.raises(asyncio.CancelledError):
            await first
    assert upstream.count("GET", "/manifests/v1") == 1


async def test_misses_on_names_that_do_not_exist_leave_nothing(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    missing = digest_of(b"nowhere")
    async with proxy(tmp_path / "store", upstream) as client:
        registry = registry_of(client)
        for i in range(20):
            base = f"/v2/{ALIAS}/random-{i}"
            for method, path in (
                ("GET", f"{base}/manifests/latest"),
                ("HEAD", f"{base}/manifests/latest"),
                ("GET", f"{base}/blobs/{missing}"),
                ("HEAD", f"{base}/blobs/{missing}"),
                ("GET", f"{base}/tags/list"),
            ):
                resp = await client.request(method, path)
                assert resp.status == 404, (method, path, resp.status)
            canonical = repo_of(client, f"random-{i}").canonical
            assert not await registry.db.read(Index.repo_exists, canonical)
