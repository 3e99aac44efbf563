"""Eviction unlinks a file only if no writer put the same digest back meanwhile: a push or a
pulled manifest that stores a digest while eviction is deleting it keeps its file (in-process;
the interleaving forced by a store that runs the writer right before the evicted file's unlink)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.config import config_from_dict
from regproxy.evict import Evictor
from regproxy.index import Index
from regproxy.oci import Digest
from regproxy.registry import LocalRegistry
from regproxy.store import Store
from tests.unit.test_evict import NOW, OCI_MANIFEST, Shop, chunks, layer, up


class UnlinkRacingStore(Store):
    """Runs ``before_unlink`` (on the unlinking thread) right before ``target`` is deleted."""

    target: Digest | None = None
    before_unlink: Callable[[], None] | None = None

    def delete(self, digest: Digest) -> bool:
        hook = self.before_unlink
        if hook is not None and digest == self.target:
            self.before_unlink = None
            hook()
        return super().delete(digest)


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncIterator[Shop]:
    root = tmp_path / "store"
    reg = LocalRegistry(UnlinkRacingStore(root), AsyncIndex(root / "index.db"))
    await reg.open()
    yield Shop(reg)
    await reg.close()


def race(
    shop: Shop, target: Digest, writer: Callable[[], Awaitable[object]]
) -> asyncio.Future[object]:
    """Arm the store: right before ``target``'s unlink, start ``writer`` on the loop and let
    the unlink go on once the writer has finished or waits for the unlink (its claim)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[object] = loop.create_future()
    store = shop.reg.store
    assert isinstance(store, UnlinkRacingStore)

    async def run() -> None:
        try:
            done.set_result(await writer())
        except BaseException as exc:  # handed to the test
            done.set_exception(exc)

    def hook() -> None:
        waits = store.claims.waits
        loop.call_soon_threadsafe(lambda: loop.create_task(run()))
        deadline = time.monotonic() + 10
        while not done.done() and store.claims.waits == waits and time.monotonic() < deadline:
            time.sleep(0.001)

    store.target, store.before_unlink = target, hook
    return done


async def evict_all(shop: Shop, tmp_path: Path) -> None:
    config = config_from_dict(
        {"storage": {"root": str(tmp_path / "store"), "max_size": 1, "min_free": 0}}
    )
    r = await Evictor(shop.reg, config, clock=lambda: NOW).check()
    assert r is not None and r.manifests == 1


async def test_a_blob_pushed_again_while_its_file_is_being_evicted_keeps_its_file(
    shop: Shop, tmp_path: Path
) -> None:
    data = layer("pushed twice")
    await shop.image(up("team/old"), "v1", [data], at=100.0)
    again = up("team/again")
    pushed = race(
        shop,
        Digest.of(data),
        lambda: shop.reg.uploads.monolithic(again, Digest.of(data), chunks(data), len(data)),
    )
    await evict_all(shop, tmp_path)
    await asyncio.wait_for(pushed, 10)
    # the push's row and its file, whichever order the two took
    links = await shop.reg.db.read(Index.missing_blobs, again.canonical, [str(Digest.of(data))])
    assert links == []
    assert shop.reg.store.read(Digest.of(data)) == data


async def test_a_manifest_pulled_again_while_its_file_is_being_evicted_keeps_its_file(
    shop: Shop, tmp_path: Path
) -> None:
    body = await shop.image(up("team/old"), "v1", [layer("l")], at=100.0)
    repo = up("team/pulled")
    pulled = race(
        shop,
        Digest.of(body),
        lambda: shop.reg.put_manifest(
            repo, "v2", body, OCI_MANIFEST, verify_refs=False, pinned=False
        ),
    )
    await evict_all(shop, tmp_path)
    await asyncio.wait_for(pulled, 10)
    assert await shop.held(repo, body)
    assert (await shop.reg.get_manifest(repo, "v2")).body == body
    assert shop.reg.store.read(Digest.of(body)) == body
