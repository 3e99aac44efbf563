"""A read that finds its content just evicted: a pull-through fetches it again, a local name
answers as if it had never been there (in-process, with an upstream of the tests' own)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from regproxy.async_index import AsyncIndex
from regproxy.config import Config, config_from_dict
from regproxy.errors import ManifestUnknown
from regproxy.evict_batch import evict_lru
from regproxy.index import Index
from regproxy.names import NameResolver
from regproxy.oci import Digest
from regproxy.proxy import ProxyRegistry
from regproxy.store import Store
from tests.fakes import FakeUpstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class EvictingStore(Store):
    """Runs ``before_read`` once, on the executor thread, right before the named file is read:
    the moment between a lookup that found a manifest and the read of its bytes."""

    target: str | None = None
    before_read: Callable[[], None] | None = None

    def read(self, digest: Digest) -> bytes:
        hook, self.before_read = self.before_read, None
        if hook is not None and str(digest) == self.target:
            hook()
        return super().read(digest)


def evict_everything(root: Path, store: Store) -> None:
    """What the daemon's evictor does, from another connection: the index rows first (one
    batch over every unit), then the files."""
    ix = Index(root / "index.db")
    try:
        batch = evict_lru(ix, 10**12, (float("-inf"), "", ""), now=4e9, in_use=0.0, busy=())
    finally:
        ix.close()
    assert batch.evicted
    for d in batch.files:
        store.delete(Digest.parse(d))


def config_for(tmp_path: Path, upstream: FakeUpstream) -> Config:
    return config_from_dict(
        {
            "storage": {"root": str(tmp_path / "store"), "min_free": 0},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
            "tag_ttl": "1h",
        }
    )


@pytest.fixture
async def proxy(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[ProxyRegistry]:
    root = tmp_path / "store"
    reg = ProxyRegistry(
        EvictingStore(root), AsyncIndex(root / "index.db"), config_for(tmp_path, upstream)
    )
    await reg.open()
    yield reg
    await reg.close()


def image(upstream: FakeUpstream, repo: str, tag: str) -> str:
    config = json.dumps({"repo": repo, "tag": tag}).encode()
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": upstream.add_blob(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    return upstream.add_manifest(repo, tag, body, OCI_MANIFEST)


async def test_a_tag_evicted_between_lookup_and_read_is_fetched_again(
    proxy: ProxyRegistry, upstream: FakeUpstream, tmp_path: Path
) -> None:
    digest = image(upstream, "team/app", "v1")
    repo, _ = NameResolver(proxy.config).parse_reference("fake.test/team/app")
    got = await proxy.get_manifest(repo, "v1")
    assert str(got.digest) == digest and upstream.count("GET", "/manifests/v1") == 1
    # the next lookup finds the tag (the index, not a cached body), then eviction strikes
    proxy.cache.forget(bodies=[digest])
    store = proxy.store
    assert isinstance(store, EvictingStore)
    store.target = digest
    store.before_read = lambda: evict_everything(tmp_path / "store", store)
    again = await proxy.get_manifest(repo, "v1")
    assert str(again.digest) == digest and again.body == got.body
    assert store.before_read is None  # the race happened
    assert upstream.count("GET", "/manifests/v1") == 2  # fetched again, not a 404
    assert await proxy.db.read(Index.manifest_in_repo, repo.canonical, digest) is not None
    assert store.stat(Digest.parse(digest)) == len(got.body)


async def test_a_local_manifest_evicted_between_lookup_and_read_is_unknown(
    proxy: ProxyRegistry, tmp_path: Path
) -> None:
    repo, _ = NameResolver(proxy.config).parse_reference("spectro-images/mine/app")
    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": str(Digest.of(b"{}")),
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    await proxy.put_manifest(repo, "v1", body, OCI_MANIFEST, verify_refs=False, pinned=False)
    digest = str(Digest.of(body))
    proxy.cache.forget(bodies=[digest])
    store = proxy.store
    assert isinstance(store, EvictingStore)
    store.target = digest
    store.before_read = lambda: evict_everything(tmp_path / "store", store)
    for reference in ("v1", "v1", digest):  # the same answer every time: never there
        with pytest.raises(ManifestUnknown):
            await proxy.get_manifest(repo, reference)
    assert store.before_read is None
