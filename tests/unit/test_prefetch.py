"""Prefetch: the images list, platforms, retries with backoff; pins over a real store and index."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from regproxy import pins
from regproxy.async_index import AsyncIndex
from regproxy.config import PrefetchConfig, config_from_dict
from regproxy.errors import ManifestUnknown, UpstreamError
from regproxy.index import Index
from regproxy.metrics import Metrics
from regproxy.names import NameResolver
from regproxy.oci import Descriptor, Digest
from regproxy.prefetch import (
    BACKOFF_MAX,
    Platform,
    Prefetcher,
    image_entries,
    images_from_document,
    select_children,
)
from regproxy.registry import Blob, LocalRegistry, Manifest, Registry
from regproxy.store import Store
from tests.images import make_image, make_index


# --- the list -----------------------------------------------------------------------------------
def test_image_entries_plain_and_pack_entries() -> None:
    got = image_entries(["nginx:1.25", {"image": " ghcr.io/o/i:v1 "}, "nginx:1.25"])
    assert got == ["nginx:1.25", "ghcr.io/o/i:v1"]  # trimmed, no repeats, in order
    assert image_entries(None) == []


@pytest.mark.parametrize("bad", ["nginx", [{"img": "x"}], [""], [3], [{"image": 3}]])
def test_image_entries_refuses(bad: Any) -> None:
    with pytest.raises(ValueError):
        image_entries(bad)


def test_images_from_document_shapes() -> None:
    pack = {
        "pack": {
            "name": "app",
            "content": {"images": [{"image": "a.io/x:1"}, {"image": "b.io/y@sha256:" + "0" * 64}]},
        }
    }
    assert images_from_document(pack) == ["a.io/x:1", "b.io/y@sha256:" + "0" * 64]
    assert images_from_document({"content": {"images": ["c:1"]}}) == ["c:1"]
    assert images_from_document({"prefetch": {"images": ["d:1"]}}) == ["d:1"]
    assert images_from_document({"images": [{"image": "e:1"}]}) == ["e:1"]
    assert images_from_document(["f:1", {"image": "g:1"}]) == ["f:1", "g:1"]
    assert images_from_document(None) == []
    for bad in ({"pack": {"name": "x"}}, "just text", {"pack": {"content": {"images": "x"}}}):
        with pytest.raises(ValueError):
            images_from_document(bad)


def test_config_takes_the_same_entries() -> None:
    cfg = config_from_dict(
        {
            "prefetch": {
                "images": ["nginx:1.25", {"image": "ghcr.io/o/i:v1"}],
                "platforms": ["linux/amd64"],
            }
        }
    )
    assert cfg.prefetch.images == ("nginx:1.25", "ghcr.io/o/i:v1")


# --- platforms ----------------------------------------------------------------------------------
def test_platform_parse_and_match() -> None:
    amd64 = Platform.parse("linux/amd64")
    assert amd64.matches({"os": "linux", "architecture": "amd64"})
    assert amd64.matches({"os": "linux", "architecture": "amd64", "variant": "v3"})
    assert not amd64.matches({"os": "linux", "architecture": "arm64"})
    assert not amd64.matches({"os": "windows", "architecture": "amd64"})
    assert not amd64.matches(None)
    assert not amd64.matches({"os": "unknown", "architecture": "unknown"})  # attestations
    v8 = Platform.parse("Linux/ARM64/v8")
    assert str(v8) == "linux/arm64/v8"
    assert v8.matches({"os": "linux", "architecture": "arm64"})  # v8 is arm64's default
    assert not Platform.parse("linux/arm/v6").matches({"os": "linux", "architecture": "arm"})
    for bad in ("linux", "linux/", "a/b/c/d", ""):
        with pytest.raises(ValueError):
            Platform.parse(bad)


def test_select_children() -> None:
    def d(arch: str) -> Descriptor:
        return Descriptor(
            "m", Digest.of(arch.encode()), 1, platform={"os": "linux", "architecture": arch}
        )

    kids = [d("amd64"), d("arm64"), Descriptor("m", Digest.of(b"x"), 1)]
    assert select_children(kids, ()) == kids
    assert select_children(kids, (Platform.parse("linux/arm64"),)) == [kids[1]]


# --- the prefetcher over a fake registry ------------------------------------------------------------
class _Transfer:
    def __init__(self) -> None:
        self.waited = False

    async def wait_done(self) -> None:
        self.waited = True


class FakeRegistry:
    """Serves a multi-arch image after ``down`` failed manifest requests."""

    def __init__(self, down: int) -> None:
        self.down = down
        a, b = make_image("amd64", layer_sizes=(10,)), make_image("arm64", layer_sizes=(10,))
        self.images = {a.digest: a, b.digest: b}
        self.index_body = make_index({"amd64": a, "arm64": b})
        self.a, self.b = a, b
        self.blob_requests: list[str] = []
        self.transfers: list[_Transfer] = []
        self.pinned: list[tuple[str, list[str], bool]] = []
        self.db = self  # the Prefetcher pins through pins.pin_digests: registry.db.write(...)
        self.metrics = Metrics()

    async def write(self, fn: Any, repo: str, digests: list[str], pinned: bool) -> int:
        assert fn is Index.pin_manifests
        self.pinned.append((repo, digests, pinned))
        return len(digests)

    async def get_manifest(self, repo: Any, reference: str) -> Manifest:
        if self.down > 0:
            self.down -= 1
            raise UpstreamError("up.test", "Cannot connect", kind="connect")
        if reference in self.images:
            body = self.images[reference].manifest
            return Manifest(
                Digest.parse(reference),
                "application/vnd.oci.image.manifest.v1+json",
                len(body),
                body,
            )
        if reference == "missing":
            raise ManifestUnknown(reference)
        body = self.index_body
        return Manifest(Digest.of(body), "application/vnd.oci.image.index.v1+json", len(body), body)

    async def get_blob(self, repo: Any, digest: Digest) -> Blob:
        self.blob_requests.append(str(digest))
        t = _Transfer()
        self.transfers.append(t)
        return Blob(digest, 10, stream=t)

    async def local_blob(self, repo: Any, digest: Digest) -> Blob | None:
        return Blob(digest, 10, data=b"x" * 10)

    async def mount_blob(self, repo: Any, digest: Digest, source: Any) -> bool:
        return True


def _prefetcher(reg: FakeRegistry, **cfg: Any) -> tuple[Prefetcher, list[float]]:
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    resolver = NameResolver(
        config_from_dict({"upstreams": {"up.test": {"url": "http://127.0.0.1:9"}}})
    )
    conf = PrefetchConfig(**{"images": ("up.test/team/app:multi",), **cfg})
    return Prefetcher(reg, resolver, conf, sleep=sleep), sleeps


async def test_retries_with_doubling_backoff_then_pins() -> None:
    reg = FakeRegistry(down=9)
    pre, sleeps = _prefetcher(reg)
    assert not pre.prefetch_done and pre.state == {"up.test/team/app:multi": "pending"}
    summary = await pre.run_until_done()
    assert sleeps == [1, 2, 4, 8, 16, 32, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
    assert not summary.failed and pre.prefetch_done
    assert pre.state == {"up.test/team/app:multi": "done"}
    [res] = summary.results
    assert res.manifests == 3 and res.blobs == 4 and res.fetched_bytes == 40
    assert all(t.waited for t in reg.transfers)  # every blob waited for until committed
    [(repo, digests, pinned)] = reg.pinned
    assert repo == "spectro-images/up.test/team/app" and pinned
    assert digests == [str(Digest.of(reg.index_body)), reg.a.digest, reg.b.digest]


async def test_attempts_bound_and_failure_recorded() -> None:
    reg = FakeRegistry(down=100)
    pre, sleeps = _prefetcher(reg)
    summary = await pre.run_until_done(attempts=3)
    assert sleeps == [1, 2]
    [res] = summary.failed
    assert res.upstream == "up.test" and "Cannot connect" in res.error
    assert pre.state == {"up.test/team/app:multi": "failed"} and not pre.prefetch_done
    assert reg.pinned == []


async def test_platform_filter_fetches_one_child() -> None:
    reg = FakeRegistry(down=0)
    pre, _ = _prefetcher(reg, platforms=("linux/arm64",))
    summary = await pre.run_until_done()
    assert not summary.failed
    want = {str(Digest.of(x)) for x in (reg.b.config, *reg.b.layers)}
    assert set(reg.blob_requests) == want
    assert reg.pinned[0][1] == [str(Digest.of(reg.index_body)), reg.b.digest]


async def test_no_matching_platform_is_a_failure() -> None:
    reg = FakeRegistry(down=0)
    pre, _ = _prefetcher(reg, platforms=("linux/s390x",))
    summary = await pre.run_until_done(attempts=1)
    assert "no child matches the platforms linux/s390x" in summary.failed[0].error


def test_nothing_to_prefetch_is_done() -> None:
    pre, _ = _prefetcher(FakeRegistry(0), images=())
    assert pre.prefetch_done


# --- pins over a real store ------------------------------------------------------------------------
@pytest.fixture
async def registry(tmp_path: Path) -> Any:
    reg = LocalRegistry(Store(tmp_path / "store"), AsyncIndex(tmp_path / "index.db"))
    await reg.open()
    yield reg
    await reg.close()


async def test_pin_unpin_keeps_a_child_another_pinned_index_lists(registry: Registry) -> None:
    resolver = NameResolver(config_from_dict({}))
    repo, _ = resolver.parse_reference("ghcr.io/o/app")
    a, b = make_image("amd64", layer_sizes=(10,)), make_image("arm64", layer_sizes=(10,))
    one, both = make_index({"amd64": a}), make_index({"amd64": a, "arm64": b})
    for m in (a, b):
        await registry.put_manifest(
            repo, m.digest, m.manifest, None, verify_refs=False, pinned=False
        )
    await registry.put_manifest(repo, "one", one, None, verify_refs=False, pinned=False)
    await registry.put_manifest(repo, "both", both, None, verify_refs=False, pinned=False)
    assert await pins.list_pins(registry) == []

    assert sorted(await pins.pin(registry, repo, "both")) == sorted(
        [pins_digest(both), a.digest, b.digest]
    )
    assert await pins.pin(registry, repo, "one") == [pins_digest(one), a.digest]
    listed = {p.digest: p for p in await pins.list_pins(registry)}
    assert set(listed) == {pins_digest(one), pins_digest(both)}
    assert listed[pins_digest(both)].tags == ["both"] and listed[pins_digest(both)].is_index
    assert {c.digest for c in listed[pins_digest(both)].children} == {a.digest, b.digest}
    assert json.dumps(listed[pins_digest(one)].to_json())

    # unpinning "both" leaves a (still listed by the pinned "one"), unpins b
    assert sorted(await pins.unpin(registry, repo, "both")) == sorted([pins_digest(both), b.digest])
    rows = await registry.db.read(Index.list_pins, None)
    assert {r.digest for r in rows} == {pins_digest(one), a.digest}
    with pytest.raises(ManifestUnknown):
        await pins.pin(registry, repo, "nope")


def pins_digest(body: bytes) -> str:
    return str(Digest.of(body))


async def test_pins_are_listed_in_keyset_pages_with_indexes_grouped_across_pages(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = NameResolver(config_from_dict({}))
    for n in range(4):
        repo, _ = resolver.parse_reference(f"ghcr.io/o/app{n}")
        a, b = make_image("amd64", layer_sizes=(10,)), make_image("arm64", layer_sizes=(10,))
        both = make_index({"amd64": a, "arm64": b})
        for m in (a, b):
            for blob in (m.config, *m.layers):
                await registry.uploads.monolithic(repo, Digest.of(blob), _one(blob), len(blob))
            await registry.put_manifest(repo, m.digest, m.manifest, None, pinned=False)
        await registry.put_manifest(repo, "v1", both, None, verify_refs=False, pinned=False)
        await pins.pin(registry, repo, "v1")
    whole = await pins.list_pins(registry)
    monkeypatch.setattr(pins, "PIN_PAGE", 2)  # an index and its children split over pages
    paged = await pins.list_pins(registry)
    assert [i.to_json() for i in paged] == [i.to_json() for i in whole]
    assert len(paged) == 4 and all(i.is_index and len(i.children) == 2 for i in paged)


async def _one(data: bytes) -> Any:
    yield data
