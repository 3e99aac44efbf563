"""The web page's bundle upload and ``Expect: 100-continue`` (regproxy.expect): what the request's
head earns (no login, no right, a wrong token, a bad name, no room) is the final answer instead of
``100 Continue``, with ``Connection: close``, so the client never sends the body; an upload that
passes them gets the 100 when its form is about to be read (an in-process daemon, raw sockets and
curl on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from regproxy.web_keys import REGISTRY_KEY
from tests.images import make_image, write_layout
from tests.integration.test_push_room import answer
from tests.uiclient import login, start

Client = TestClient[Any, Any]
BOUNDARY = "regproxy-test-boundary"
BIG = 64 * 1024 * 1024  # announced, never sent


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    c = await start(tmp_path / "store")
    yield c
    await c.close()


def cookie_of(client: Client) -> str:
    jar = client.session.cookie_jar.filter_cookies(client.make_url("/ui/"))
    return "; ".join(f"{k}={m.value}" for k, m in jar.items())


async def ask(
    client: Client, path: str, length: int, headers: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A multipart POST's head with ``Expect: 100-continue``; no byte of its body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(
        (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {length}\r\n{headers}\r\n"
        ).encode()
    )
    await writer.drain()
    return reader, writer


def form(csrf: str, bundle: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="csrf"\r\n\r\n{csrf}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="bundle"; filename="b.tar"\r\n'
            "Content-Type: application/x-tar\r\n\r\n"
        ).encode()
        + bundle
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def bundle(tmp_path: Path) -> bytes:
    layout, archive = tmp_path / "layout", tmp_path / "bundle.tar"
    write_layout(layout, {"1": make_image("amd64")})
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    return archive.read_bytes()


async def test_refusals_come_instead_of_100_continue_and_an_upload_that_passes_gets_it(
    client: Client, tmp_path: Path
) -> None:
    refusals: list[tuple[str, str, int]] = [("/ui/upload", "", 401)]  # not logged in
    csrf = await login(client)
    cookie = f"Cookie: {cookie_of(client)}\r\nAccept: application/json\r\n"
    refusals += [
        ("/ui/upload", cookie + "X-CSRF-Token: wrong\r\n", 403),
        ("/ui/upload?name=Not%20A%20Name!", cookie, 400),
    ]
    for path, headers, want in refusals:
        reader, writer = await ask(client, path, BIG, headers)
        try:
            status, got, body = await asyncio.wait_for(answer(reader), 30)
            # the final answer is the first (no 100 before it), and the connection closes
            assert (status, got.get("connection")) == (want, "close"), (path, got, body)
        finally:
            writer.close()
    registry = client.server.app[REGISTRY_KEY]
    room = registry.uploads.space.disk
    registry.uploads.space.disk = lambda: (100 * 2**30, 2**30)  # 1 GiB free, floor 5 GiB
    reader, writer = await ask(client, "/ui/upload", BIG, cookie)
    try:
        status, got, body = await asyncio.wait_for(answer(reader), 30)
        assert (status, got.get("connection")) == (507, "close"), (got, body)
        assert b"insufficient storage" in body
    finally:
        writer.close()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
    registry.uploads.space.disk = room
    data = form(csrf, bundle(tmp_path))
    reader, writer = await ask(client, "/ui/upload?name=docker.io/team/app", len(data), cookie)
    try:
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30) == (
            b"HTTP/1.1 100 Continue\r\n\r\n"
        )
        writer.write(data)
        status, got, body = await asyncio.wait_for(answer(reader), 60)
        assert status == 200 and got.get("connection") != "close", body
        assert b"spectro-images/docker.io/team/app:1" in body
    finally:
        writer.close()


@pytest.mark.process
async def test_curl_sends_no_bundle_to_an_upload_refused_for_room(
    client: Client, tmp_path: Path
) -> None:
    """curl -F waiting up to 50 s for the 100: the 507 comes at once, nothing uploaded."""
    csrf = await login(client)
    big = tmp_path / "big.tar"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))
    client.server.app[REGISTRY_KEY].uploads.space.disk = lambda: (100 * 2**30, 2**30)
    proc = await asyncio.create_subprocess_exec(
        *("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}"),
        *("--expect100-timeout", "50", "-H", "Expect: 100-continue"),
        *("-H", f"Cookie: {cookie_of(client)}", "-F", f"csrf={csrf}", "-F", f"bundle=@{big}"),
        f"http://127.0.0.1:{client.port}/ui/upload",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 55)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert out.decode() == "507 0"
