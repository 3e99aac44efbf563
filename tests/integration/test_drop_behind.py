"""A pulled blob above ``storage.drop_behind_above`` leaves the page cache behind its writer
(regproxy.store.BlobWriter.drop_behind), never below what an open response still has to send:
every client gets every byte, and the transfer says how much it dropped.

regproxy's app runs in this process (tests/inproc.py); the fake upstream in the test's loop.
That pages really leave the cache is tests/unit/test_store_drop.py's (on a disk; here the
store may be in RAM)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp

from regproxy.inflight import Transfer
from regproxy.oci import Digest
from regproxy.page_cache import DROP_LAG
from regproxy.store import Store
from tests.fakes import BlobFault, FakeUpstream
from tests.inproc import AppDaemon
from tests.integration.test_fastfile import (
    TLS,
    tls,  # noqa: F401  (the fixture)
)
from tests.integration.test_fetch_faults import proxy_config, start_daemon
from tests.unit.disk import (
    cached,
    disk_dir,  # noqa: F401  (the fixture)
)

MiB = 1024 * 1024
SIZE = DROP_LAG + 24 * MiB


def dropped(d: AppDaemon, digest: str) -> int | None:
    """``dropped=`` of the transfer's ``fetch.committed`` line (None: no such line)."""
    for line in reversed(d.log().splitlines()):
        if "fetch.committed" in line and digest in line:
            m = re.search(r"dropped=(\d+)", line)
            return int(m.group(1)) if m else None
    return None


async def get_whole(
    session: aiohttp.ClientSession,
    url: str,
    wait: asyncio.Event | None,
    started: asyncio.Event | None = None,
    at: tuple[int, asyncio.Event] | None = None,
) -> str:
    """The blob's digest as received; ``started`` is set once its first 64 KiB are in; with
    ``wait``, it then takes nothing more until ``wait`` is set (a reader that holds its place);
    ``at``: (n, an event set once n bytes are in)."""
    h = hashlib.sha256()
    async with session.get(url) as r:
        assert r.status == 200
        h.update(await r.content.readexactly(64 * 1024))
        got = 64 * 1024
        if started is not None:
            started.set()
        if wait is not None:
            await asyncio.wait_for(wait.wait(), 60)
        async for chunk in r.content.iter_chunked(MiB):
            h.update(chunk)
            got += len(chunk)
            if at is not None and got >= at[0]:
                at[1].set()
    return "sha256:" + h.hexdigest()


async def wait_dropped(d: AppDaemon, digest: str) -> int | None:
    for _ in range(200):  # the line comes once the commit's row is in (bounded)
        if (n := dropped(d, digest)) is not None:
            return n
        await asyncio.sleep(0.05)
    return None


async def test_a_blob_above_the_threshold_drops_behind_and_comes_whole(
    upstream: FakeUpstream, app_factory: Callable[..., AppDaemon]
) -> None:
    data = os.urandom(SIZE)
    d = upstream.add_blob(data)
    # drops are decided as bytes are written, below the reader's place: the upstream waits
    # for the reader to catch up once (a reader behind a fast writer would hold every page)
    hold, gate, caught_up = SIZE - 16 * MiB, asyncio.Event(), asyncio.Event()
    upstream.blob_faults[d] = BlobFault(hold_at=hold, gate=gate, step=MiB)
    cfg = proxy_config(upstream, storage={"drop_behind_above": "1MiB"})
    proxy = await start_daemon(app_factory, cfg)
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    async with aiohttp.ClientSession() as session:
        whole = asyncio.ensure_future(get_whole(session, url, None, at=(hold, caught_up)))
        await asyncio.wait_for(caught_up.wait(), 60)
        gate.set()
        assert await asyncio.wait_for(whole, 60) == d
        # and a client after the commit: from the committed file, read back from disk
        assert await asyncio.wait_for(get_whole(session, url, None), 60) == d
    n = await wait_dropped(proxy, d)
    assert n is not None and 0 < n <= SIZE - DROP_LAG, proxy.log()[-2000:]


async def test_nothing_a_reader_still_needs_is_dropped(
    upstream: FakeUpstream, app_factory: Callable[..., AppDaemon]
) -> None:
    """A reader that holds its place at its first bytes while another takes the whole blob:
    nothing is dropped (the floor is its place), and it then gets every byte too."""
    data = os.urandom(SIZE)
    d = upstream.add_blob(data)
    gate = asyncio.Event()
    upstream.blob_faults[d] = BlobFault(hold_at=4 * MiB, gate=gate, step=MiB)
    cfg = proxy_config(upstream, storage={"drop_behind_above": "1MiB"})
    proxy = await start_daemon(app_factory, cfg)
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    slow_may_read, slow_in, fast_in = asyncio.Event(), asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(get_whole(session, url, slow_may_read, slow_in))
        fast = asyncio.ensure_future(get_whole(session, url, None, fast_in))
        # both responses are reading the transfer before the upstream sends the rest
        await asyncio.wait_for(asyncio.gather(slow_in.wait(), fast_in.wait()), 60)
        gate.set()
        assert await asyncio.wait_for(fast, 60) == d  # its last byte: after the commit
        slow_may_read.set()
        assert await asyncio.wait_for(slow, 60) == d
    assert await wait_dropped(proxy, d) == 0


async def test_a_blob_at_or_under_the_threshold_stays_cached(
    upstream: FakeUpstream, app_factory: Callable[..., AppDaemon]
) -> None:
    data = os.urandom(SIZE)
    d = upstream.add_blob(data)
    cfg = proxy_config(upstream, storage={"drop_behind_above": f"{SIZE}B"})
    proxy = await start_daemon(app_factory, cfg)
    async with aiohttp.ClientSession() as session:
        url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
        assert await asyncio.wait_for(get_whole(session, url, None), 60) == d
    assert await wait_dropped(proxy, d) == 0


async def test_the_floor_is_the_lowest_offset_an_open_response_still_needs(
    tmp_path: os.PathLike[str],
) -> None:
    store = Store(tmp_path / "store")  # type: ignore[operator]
    store.open()
    t = Transfer(Digest("sha256", "0" * 64), store)
    t.writer = store.writer()
    t.size = 4 * MiB
    t.writer.write(b"x" * 3 * MiB)
    t.written = 3 * MiB
    assert t.read_floor() == 3 * MiB  # nobody reading: all that is written
    a = t.spans(1 * MiB, t.size - 1)
    b = t.spans(2 * MiB, t.size - 1)
    assert (await anext(a))[1:] == (1 * MiB, 3 * MiB)
    assert (await anext(b))[1:] == (2 * MiB, 3 * MiB)
    assert t.read_floor() == 1 * MiB  # a has not sent its span yet
    t.written = 4 * MiB - 1
    t.notify()
    assert (await anext(a))[1:] == (3 * MiB, 4 * MiB - 1)
    assert t.read_floor() == 2 * MiB  # a sent up to 3 MiB; b still at 2
    await a.aclose()
    await b.aclose()
    assert t.read_floor() == t.written
    t.writer.abort()


async def read(
    session: aiohttp.ClientSession,
    url: str,
    ctx: ssl.SSLContext | None,
    first: int = 0,
    last: int | None = None,
    pause: float = 0.0,
) -> bytes:
    """Bytes ``first..last`` of the blob (a Range request unless all of it), ``pause`` seconds
    after each MiB (a slow client)."""
    whole = first == 0 and last is None
    headers = {} if whole else {"Range": f"bytes={first}-{'' if last is None else last}"}
    out = bytearray()
    async with session.get(url, headers=headers, ssl=ctx or True) as r:
        assert r.status == (200 if whole else 206)
        async for chunk in r.content.iter_chunked(MiB):
            out += chunk
            await asyncio.sleep(pause)
    return bytes(out)


async def test_readers_of_pages_already_dropped_get_every_byte(
    upstream: FakeUpstream,
    app_factory: Callable[..., AppDaemon],
    disk_dir: Path,  # noqa: F811
    tls: TLS,  # noqa: F811
) -> None:
    """On a disk (where pages do leave the cache) and over TLS too (the in-flight file is read
    with pread there): once the first bytes are dropped, a client joining from byte 0, Range
    requests below and above the drop point, a slow client, and one after the commit."""
    data = os.urandom(SIZE + 16 * MiB)
    d = upstream.add_blob(data)
    gate = asyncio.Event()
    upstream.blob_faults[d] = BlobFault(hold_at=len(data) - 8 * MiB, gate=gate, step=MiB)
    storage = {"drop_behind_above": "1MiB", "root": str(disk_dir / "store")}
    cfg = proxy_config(upstream, storage=storage)
    if tls[0] is not None:
        cfg["tls"] = tls[0]
    proxy = await start_daemon(app_factory, cfg)
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    ctx = tls[1]
    async with aiohttp.ClientSession() as session:
        # the transfer is started by a request for its last bytes: nothing below holds pages
        # (drops are decided as bytes are written: a reader's place at the hold would count)
        first = asyncio.ensure_future(read(session, url, ctx, len(data) - 4 * MiB))
        await asyncio.wait_for(upstream.blob_faults[d].holding.wait(), 60)
        tmp = disk_dir / "store" / "tmp"
        for _ in range(400):  # bounded: until the first pages are dropped
            files = [p for p in tmp.iterdir() if p.stat().st_size > DROP_LAG]
            if files and not cached(files[0], 0):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the first pages were never dropped")
        late = [
            read(session, url, ctx),
            read(session, url, ctx, MiB + 7, 20 * MiB),
            read(session, url, ctx, len(data) - 12 * MiB),
            read(session, url, ctx, pause=0.005),
        ]
        joined = asyncio.gather(*late)
        await asyncio.sleep(0.2)  # (they join the transfer; not needed for the bytes)
        gate.set()
        got = await asyncio.wait_for(asyncio.gather(first, joined), 120)
        assert got[0] == data[len(data) - 4 * MiB :]
        assert got[1][0] == data
        assert got[1][1] == data[MiB + 7 : 20 * MiB + 1]
        assert got[1][2] == data[len(data) - 12 * MiB :]
        assert got[1][3] == data
        after = await asyncio.wait_for(read(session, url, ctx, 3, len(data) - 2), 60)
        assert after == data[3:-1]
    n = await wait_dropped(proxy, d)
    assert n is not None and n > 0


async def test_what_a_reader_held_back_leaves_the_cache_once_it_is_done(
    upstream: FakeUpstream,
    app_factory: Callable[..., AppDaemon],
    disk_dir: Path,  # noqa: F811
) -> None:
    """A reader slower than the upstream holds the pages it still needs, and the writes end
    before it moves on: once the last reader is done, the blob's pages go too (they stayed
    cached, all of them, as if the blob were below the threshold)."""
    data = os.urandom(SIZE)
    d = upstream.add_blob(data)
    storage = {"drop_behind_above": "1MiB", "root": str(disk_dir / "store")}
    proxy = await start_daemon(app_factory, proxy_config(upstream, storage=storage))
    url = f"{proxy.url}/v2/fake.test/app/blobs/{d}"
    may_read, reading = asyncio.Event(), asyncio.Event()
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(get_whole(session, url, may_read, reading))
        await asyncio.wait_for(reading.wait(), 60)
        assert await wait_dropped(proxy, d) == 0  # committed: it held every page
        may_read.set()
        assert await asyncio.wait_for(slow, 60) == d
    blob = Path(storage["root"]) / "blobs" / "sha256" / d.split(":")[1][:2] / d.split(":")[1]
    assert blob.exists(), blob
    # (its last MiBs may still be in the sockets' buffers when it goes: those pages stay)
    probes = range(0, SIZE - 8 * MiB, MiB)
    for _ in range(200):  # bounded: the drop follows the response's end
        if not any(cached(blob, at) for at in probes):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError([at for at in probes if cached(blob, at)])
