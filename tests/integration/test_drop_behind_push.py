"""A pushed blob above ``storage.drop_behind_above`` leaves the page cache behind its writer as
a pulled one does (regproxy.store.BlobWriter: nobody reads a push before its commit), pushed
whole (POST + PUT) or in PATCHes; the blob comes back whole. On a disk, where pages do leave.

regproxy's app runs in this process (tests/inproc.py), its store on a real disk."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from regproxy.page_cache import DROP_LAG
from tests.inproc import AppDaemon
from tests.integration.test_fetch_faults import start_daemon
from tests.unit.disk import (
    cached,
    disk_dir,  # noqa: F401  (the fixture)
)

MiB = 1024 * 1024
REPO = "/v2/team/models"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def push(session: aiohttp.ClientSession, base: str, data: bytes, patches: int) -> None:
    """POST, then ``patches`` PATCHes and a PUT, or (0) the whole body in the PUT."""
    async with session.post(f"{base}{REPO}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        location = r.headers["Location"]
    url = location if location.startswith("http") else base + location
    step = len(data) // patches if patches else 0
    for i in range(patches):
        part = data[i * step : len(data) if i == patches - 1 else (i + 1) * step]
        async with session.patch(url, data=part) as r:
            assert r.status == 202, await r.text()
            location = r.headers["Location"]
            url = location if location.startswith("http") else base + location
    sep = "&" if "?" in url else "?"
    body = b"" if patches else data
    async with session.put(f"{url}{sep}digest={sha(data)}", data=body) as r:
        assert r.status == 201, await r.text()


@pytest.mark.parametrize(("patches", "above"), [(0, "1MiB"), (3, "1MiB"), (0, "0")])
async def test_a_pushed_blob_above_the_threshold_leaves_the_page_cache(
    app_factory: Callable[..., AppDaemon],
    disk_dir: Path,  # noqa: F811
    patches: int,
    above: str,
) -> None:
    data = os.urandom(DROP_LAG + 24 * MiB)
    storage = {"drop_behind_above": above, "root": str(disk_dir / "store")}
    proxy = await start_daemon(app_factory, {"storage": storage})
    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(push(session, proxy.url, data, patches), 60)
        d = sha(data)
        blob = disk_dir / "store" / "blobs" / "sha256" / d[7:9] / d[7:]
        # the first bytes went once on disk; the last DROP_LAG stay (read soon, if at all)
        assert cached(blob, 0) is (above == "0")
        assert cached(blob, 8 * MiB) is (above == "0")
        assert cached(blob, len(data) - MiB)
        async with session.get(f"{proxy.url}{REPO}/blobs/{d}") as r:
            assert r.status == 200
            assert sha(await r.read()) == d
