"""A pushed body has its room before its bytes are written (regproxy.uploads over regproxy.space),
the same floor and the same reservations as pull-through, over HTTP: the app in this process
(create_app, real TCP on 127.0.0.1), a store whose filesystem the room check sees as small."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.oci import Digest
from regproxy.proxy import ProxyRegistry
from regproxy.uploads import UPLOAD_STEP
from regproxy.web_keys import REGISTRY_KEY
from tests.fakes import BlobFault, FakeUpstream
from tests.room import small_disk_usage

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
KB = 1000
#: the filesystem the room check sees: 3 MB, of which 1 MB is the host's other workloads' and
#: 1 MB the floor (min_free): 1 MB above it for the store
DISK = 3000 * KB
OTHERS = 1000 * KB
REPO = "/v2/spectro-images/mine/app"

Client = TestClient[Any, Any]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def proxy(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[Client]:
    """The app over a store in tmp_path whose disk is :data:`DISK` bytes with a 1 MB floor
    (the real disk stays as it is)."""
    store = tmp_path / "store"
    config = config_from_dict(
        {
            "storage": {"root": str(store), "min_free": "1000KB", "upload_ttl": "0s"},
            "log": {"access": False},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
        }
    )
    client: Client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    small_disk(client, store, DISK)
    yield client
    await client.close()


def small_disk(client: Client, store: Path, size: int) -> None:
    """The store's filesystem, as the room check sees it, is ``size`` bytes: free is what the
    host's other workloads (:data:`OTHERS`) and the store's blobs and temp files leave of them."""

    registry(client).space.disk = small_disk_usage(store, size, OTHERS)


def registry(client: Client) -> ProxyRegistry:
    reg = client.server.app[REGISTRY_KEY]
    assert isinstance(reg, ProxyRegistry)
    return reg


def temp_files(tmp_path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (tmp_path / "store" / "tmp").iterdir()}


async def refused(client: Client, reason: str) -> float:
    m = registry(client).metrics.registry
    return m.get_sample_value("regproxy_upload_refused_total", {"reason": reason}) or 0.0


async def until(check: Callable[[], bool]) -> None:
    """Wait (bounded) for the server side to get where the test needs it."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the server never got there")


async def raw(
    client: Client, head: str, body: bytes = b""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request written by hand: its head and the first ``body`` bytes, no more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def start(client: Client) -> str:
    resp = await client.post(f"{REPO}/blobs/uploads/")
    assert resp.status == 202, await resp.text()
    return resp.headers["Docker-Upload-UUID"]


async def offset(client: Client, uid: str) -> str:
    resp = await client.get(f"{REPO}/blobs/uploads/{uid}")
    assert resp.status == 204
    return resp.headers["Range"]


async def patch(client: Client, uid: str, at: int, data: bytes) -> Any:
    return await client.patch(
        f"{REPO}/blobs/uploads/{uid}",
        data=data,
        headers={"Content-Range": f"{at}-{at + len(data) - 1}"},
    )


async def test_a_monolithic_push_without_room_is_507_before_its_body_is_read(
    proxy: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1.2 MB with 1 MB above the floor: the answer comes to a request whose body was never
    sent, nothing is written to tmp/, the connection is not kept; a push that fits then does."""
    caplog.set_level(logging.INFO)
    big = os.urandom(1200 * KB)
    reader, writer = await raw(
        proxy,
        f"POST {REPO}/blobs/uploads/?digest={sha(big)} HTTP/1.1\r\nHost: x\r\n"
        f"Content-Length: {len(big)}\r\n",
    )
    status, headers, body = await answer(reader)
    writer.close()
    assert status == 507 and headers["connection"] == "close"
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNKNOWN" and "insufficient storage" in error["message"]
    assert f"would hold {len(big)} bytes" in error["detail"]
    assert "min_free 1000000" in error["detail"], error
    assert temp_files(tmp_path) == {}
    assert await refused(proxy, "no_space") == 1
    line = next(r.getMessage() for r in caplog.records if "upload.no_space" in r.getMessage())
    for part in ("repo=spectro-images/mine/app", f"size={len(big)}", "free=", "min_free=1000000"):
        assert part in line, line
    assert registry(proxy).space.reserved == 0
    fits = os.urandom(900 * KB)
    resp = await proxy.post(f"{REPO}/blobs/uploads/?digest={sha(fits)}", data=fits)
    assert resp.status == 201, await resp.text()
    assert await (await proxy.get(f"{REPO}/blobs/{sha(fits)}")).read() == fits


async def test_a_chunk_without_room_keeps_the_session_which_resumes_at_its_offset(
    proxy: Client, tmp_path: Path
) -> None:
    """400 kB in, then a 700 kB PATCH and a 700 kB closing PUT: both 507 before a byte, the
    session still at 400 kB; a 300 kB PATCH at that offset, and the PUT, then succeed."""
    uid = await start(proxy)
    first, late, rest = os.urandom(400 * KB), os.urandom(700 * KB), os.urandom(300 * KB)
    assert (await patch(proxy, uid, 0, first)).status == 202
    resp = await patch(proxy, uid, len(first), late)
    assert resp.status == 507, await resp.text()
    assert resp.headers["Connection"] == "close"
    assert (
        f"would hold {len(first) + len(late)} bytes" in (await resp.json())["errors"][0]["detail"]
    )
    resp = await proxy.put(f"{REPO}/blobs/uploads/{uid}?digest={sha(first + late)}", data=late)
    assert resp.status == 507, await resp.text()
    assert await offset(proxy, uid) == f"0-{len(first) - 1}"
    assert temp_files(tmp_path) == {uid: len(first)}
    assert (await patch(proxy, uid, len(first), rest)).status == 202
    resp = await proxy.put(f"{REPO}/blobs/uploads/{uid}?digest={sha(first + rest)}")
    assert resp.status == 201, await resp.text()
    assert await (await proxy.get(f"{REPO}/blobs/{sha(first + rest)}")).read() == first + rest
    assert await refused(proxy, "no_space") == 2
    assert registry(proxy).space.reserved == 0


async def test_a_streamed_patch_is_cut_at_the_step_that_does_not_fit(
    proxy: Client, tmp_path: Path
) -> None:
    """A chunked PATCH (no length) reserves 256 kB at a time: with 3 MB above the floor, of
    4 MB sent the bytes that would cross the floor are refused after 2 MB reached the file;
    what the PATCH wrote is cut off, the session is as before and goes on."""
    small_disk(proxy, tmp_path / "store", 5000 * KB)
    registry(proxy).uploads.step = 256 * KB
    uid = await start(proxy)
    first = os.urandom(100 * KB)
    assert (await patch(proxy, uid, 0, first)).status == 202
    sent = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(40):
            sent += 100 * KB
            yield os.urandom(100 * KB)

    resp = await proxy.patch(f"{REPO}/blobs/uploads/{uid}", data=stream())
    assert resp.status == 507, await resp.text()
    detail = (await resp.json())["errors"][0]["detail"]
    assert "bytes more than there is room for" in detail, detail
    assert sent > 2 * 1024 * 1024  # two writes of the buffer reached the file first
    assert await offset(proxy, uid) == f"0-{len(first) - 1}"
    assert temp_files(tmp_path) == {uid: len(first)}
    assert await refused(proxy, "no_space") == 1
    assert registry(proxy).space.reserved == 0
    # near the floor a step (64 MiB by default) does not fit: what is left above it is held,
    # and a streamed body that fits in it goes through
    registry(proxy).uploads.step = UPLOAD_STEP
    rest = os.urandom(500 * KB)

    async def rest_stream() -> AsyncIterator[bytes]:
        for i in range(0, len(rest), 100 * KB):
            yield rest[i : i + 100 * KB]

    resp = await proxy.patch(f"{REPO}/blobs/uploads/{uid}", data=rest_stream())
    assert resp.status == 202, await resp.text()
    assert await refused(proxy, "no_space") == 1
    resp = await proxy.put(f"{REPO}/blobs/uploads/{uid}?digest={sha(first + rest)}")
    assert resp.status == 201, await resp.text()


async def test_a_client_gone_mid_body_gives_its_room_back(proxy: Client, tmp_path: Path) -> None:
    uid = await start(proxy)
    space = registry(proxy).space
    reader, writer = await raw(
        proxy,
        f"PATCH {REPO}/blobs/uploads/{uid} HTTP/1.1\r\nHost: x\r\nContent-Length: {900 * KB}\r\n",
        os.urandom(300 * KB),
    )
    await until(lambda: space.reserved == 900 * KB)
    resp = await proxy.post(
        f"{REPO}/blobs/uploads/?digest={sha(b'x' * 200_000)}", data=b"x" * 200_000
    )
    assert resp.status == 507  # the 900 kB held leave 100 kB above the floor
    writer.close()
    await until(lambda: space.reserved == 0)
    await until(lambda: temp_files(tmp_path) == {uid: 0})  # the chunk is cut off
    assert await offset(proxy, uid) == "0-0"
    data = os.urandom(900 * KB)
    assert (await patch(proxy, uid, 0, data)).status == 202
    resp = await proxy.put(f"{REPO}/blobs/uploads/{uid}?digest={sha(data)}")
    assert resp.status == 201, await resp.text()
    del reader


async def test_pushes_and_pull_through_misses_see_each_others_reservations(
    proxy: Client, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A 700 kB PATCH under way: a 500 kB miss is 507 (1 MB above the floor); a 700 kB miss
    under way: a 500 kB push is 507. Each completes whole once it goes on."""
    uid = await start(proxy)
    space = registry(proxy).space
    space.room_from(None)  # what is stored is not evicted for either (not what this checks)
    pushed = os.urandom(700 * KB)
    reader, writer = await raw(
        proxy,
        f"PATCH {REPO}/blobs/uploads/{uid} HTTP/1.1\r\nHost: x\r\nContent-Range: 0-{len(pushed) - 1}"
        f"\r\nContent-Length: {len(pushed)}\r\n",
        pushed[: 100 * KB],
    )
    await until(lambda: space.reserved == len(pushed))
    miss = upstream.add_blob(os.urandom(500 * KB))
    resp = await proxy.get(f"/v2/fake.test/team/app/blobs/{miss}")
    assert resp.status == 507, await resp.text()
    assert (
        f"reserved by transfers in flight {len(pushed)}"
        in (await resp.json())["errors"][0]["detail"]
    )
    writer.write(pushed[100 * KB :])
    status, _, _ = await answer(reader)
    writer.close()
    assert status == 202
    resp = await proxy.put(f"{REPO}/blobs/uploads/{uid}?digest={sha(pushed)}")
    assert resp.status == 201, await resp.text()

    small_disk(proxy, tmp_path / "store", DISK + len(pushed))  # 1 MB above the floor again
    pulled = os.urandom(700 * KB)
    d = upstream.add_blob(pulled)
    gate = asyncio.Event()
    held = upstream.blob_faults[d] = BlobFault(hold_at=100 * KB, gate=gate)
    get = asyncio.create_task(proxy.get(f"/v2/fake.test/team/app/blobs/{d}"))
    await held.holding.wait()
    transfer = registry(proxy).fetcher.get(Digest.parse(d))
    assert transfer is not None
    await transfer.wait_size()
    small = os.urandom(500 * KB)
    resp = await proxy.post(f"{REPO}/blobs/uploads/?digest={sha(small)}", data=small)
    assert resp.status == 507, await resp.text()
    assert (
        f"reserved by transfers in flight {len(pulled)}"
        in (await resp.json())["errors"][0]["detail"]
    )
    gate.set()
    resp = await get
    assert resp.status == 200 and await resp.read() == pulled


async def test_a_push_larger_than_the_cache_may_hold_is_refused_one_over_max_size_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = config_from_dict(
        {
            "storage": {"root": str(tmp_path / "store"), "min_free": 0, "max_size": "1MB"},
            "log": {"access": False},
        }
    )
    client: Client = TestClient(TestServer(create_app(config), host="127.0.0.1"))
    await client.start_server()
    try:
        big = os.urandom(1100 * KB)
        resp = await client.post(f"{REPO}/blobs/uploads/?digest={sha(big)}", data=big)
        assert resp.status == 507, await resp.text()
        assert "more than the cache may ever hold" in (await resp.json())["errors"][0]["detail"]
        assert await refused(client, "too_large") == 1
        for blob in (os.urandom(600 * KB), os.urandom(600 * KB)):
            resp = await client.post(f"{REPO}/blobs/uploads/?digest={sha(blob)}", data=blob)
            assert resp.status == 201, await resp.text()
        assert "upload.over_max_size" in caplog.text
        await asyncio.gather(*registry(client).space.asks)
    finally:
        await client.close()


# --- Expect: 100-continue: the refusal comes instead of 100, not after the body (regproxy.expect)
async def test_a_push_expecting_100_continue_gets_its_refusal_instead(proxy: Client) -> None:
    """A monolithic POST that does not fit, a PATCH to an unknown session: their final answers
    (507, 404) come to heads whose bodies wait for a 100 that never comes, and close the
    connection (the announced body is never sent); a push that fits gets 100, sends, 201."""
    big = os.urandom(1200 * KB)
    for head, want in (
        (f"POST {REPO}/blobs/uploads/?digest={sha(big)}", 507),
        (f"PATCH {REPO}/blobs/uploads/no-such-session", 404),
    ):
        reader, writer = await raw(
            proxy,
            f"{head} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {len(big)}\r\n",
        )
        status, headers, _ = await answer(reader)
        assert (status, headers.get("connection")) == (want, "close"), (head, headers)
        assert await reader.read() == b""  # closed after it, nothing else was sent
        writer.close()
    assert await refused(proxy, "no_space") == 1
    fits = os.urandom(900 * KB)
    reader, writer = await raw(
        proxy,
        f"POST {REPO}/blobs/uploads/?digest={sha(fits)} HTTP/1.1\r\nHost: x\r\n"
        f"Expect: 100-continue\r\nContent-Length: {len(fits)}\r\n",
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(fits)
    status, headers, _ = await answer(reader)
    writer.close()
    assert status == 201 and headers.get("connection") != "close"
    assert await (await proxy.get(f"{REPO}/blobs/{sha(fits)}")).read() == fits


@pytest.mark.process
async def test_curl_expecting_100_continue_sends_no_body_to_a_refused_push(
    proxy: Client, tmp_path: Path
) -> None:
    """curl (which asks for 100-continue for a body over 1 MiB) waiting up to 50 s for it: the
    507 comes at once and curl uploads nothing (its ``size_upload`` is 0)."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(1200 * KB))
    url = f"http://127.0.0.1:{proxy.port}{REPO}/blobs/uploads/?digest={sha(big.read_bytes())}"
    proc = await asyncio.create_subprocess_exec(
        *("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}"),
        *("--expect100-timeout", "50", "-H", "Expect: 100-continue"),
        *("-H", "Content-Type: application/octet-stream", "--data-binary", f"@{big}", url),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 55)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.decode() == "507 0"
    assert await refused(proxy, "no_space") == 1
