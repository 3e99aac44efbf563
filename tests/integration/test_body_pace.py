"""A request body is held to ``http.body_min_rate`` over ``http.body_min_rate_window``.

The timeout of each read alone (``http.read_timeout``) lets a client that sends a byte every
59 s hold an upload session and a connection for ever. These tests drive the app in-process on
a fake clock: the client moves the clock between the pieces it sends, the app dates each piece
as it reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

from regproxy.web_keys import METRICS_KEY
from tests.inproc import FakeTime
from tests.uiclient import AUTH, start

REPO = "spectro-images/team/drip"


async def _pieces(clock: FakeTime, piece: bytes, count: int, every: float) -> AsyncIterator[bytes]:
    """``count`` pieces, ``every`` fake seconds apart; then nothing more, without ending."""
    for _ in range(count):
        yield piece
        await asyncio.sleep(0.02)  # let the app read the piece before the clock moves on
        clock.advance(every)
    await asyncio.Event().wait()  # a body that never ends: only the app can end the request


async def test_a_dripping_upload_is_answered_408_and_keeps_nothing(tmp_path: Path) -> None:
    clock = FakeTime()
    client = await start(tmp_path / "store", timing=clock.timing)
    try:
        resp = await client.post(f"/v2/{REPO}/blobs/uploads/", headers=AUTH)
        assert resp.status == 202
        location = resp.headers["Location"]
        cut = client.app[METRICS_KEY].slow_clients_cut.labels("read")
        before = cut._value.get()
        # a byte every 30 s: each read is well within read_timeout (60 s), the pace is not
        async with asyncio.timeout(30):
            resp = await client.patch(
                location,
                data=_pieces(clock, b"x", 8, 30.0),
                headers={**AUTH, "Content-Type": "application/octet-stream"},
            )
        assert resp.status == 408
        body = await resp.json()
        assert body["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
        assert "min_rate" in body["errors"][0]["message"] + str(body["errors"][0]["detail"])
        assert cut._value.get() == before + 1
        # the session is still there and holds none of the dripped bytes
        status = await client.get(location, headers=AUTH)
        assert status.status == 204
        again = await client.patch(
            location,
            data=b"abc",
            headers={**AUTH, "Content-Type": "application/octet-stream", "Content-Range": "0-2"},
        )
        assert again.status == 202, await again.text()
        assert again.headers["Range"] == "0-2"
    finally:
        await client.close()


async def test_a_slow_but_steady_upload_goes_through(tmp_path: Path) -> None:
    """64 KiB every 40 s is 1.6 KiB/s: over the 1 KiB/s floor, however long it takes."""
    clock = FakeTime()
    client = await start(tmp_path / "store", timing=clock.timing)
    try:
        resp = await client.post(f"/v2/{REPO}/blobs/uploads/", headers=AUTH)
        location = resp.headers["Location"]

        async def steady() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"y" * 65536
                await asyncio.sleep(0.02)
                clock.advance(40.0)

        async with asyncio.timeout(30):
            resp = await client.patch(
                location,
                data=steady(),
                headers={**AUTH, "Content-Type": "application/octet-stream"},
            )
        assert resp.status == 202, await resp.text()
        assert resp.headers["Range"] == f"0-{5 * 65536 - 1}"
    finally:
        await client.close()
