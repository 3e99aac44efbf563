"""The registry's lookup cache: bounded, one invalidation API, no stale re-fill after a change."""

from __future__ import annotations

from regproxy.index import ManifestRow
from regproxy.lookups import LRU, TAG_CACHE_SECONDS, LookupCache

ROW = ManifestRow("sha256:" + "a" * 64, "application/vnd.oci.image.manifest.v1+json", 10)


def test_an_answer_read_before_a_forget_is_not_cached() -> None:
    cache = LookupCache()
    ticket = cache.ticket()  # a lookup goes to the index ...
    cache.forget(links=[("r", "d")])  # ... a delete lands meanwhile ...
    cache.put_link("r", "d", 5, ticket)  # ... and the lookup comes back with the old row
    assert cache.link("r", "d") is None
    cache.put_link("r", "d", 5, cache.ticket())
    assert cache.link("r", "d") == 5
    cache.put_link("r", "e", 7)  # no ticket: the caller wrote the row itself
    assert cache.link("r", "e") == 7


def test_forget_by_key_by_repository_and_everything() -> None:
    cache = LookupCache()
    t = cache.ticket()
    cache.put_manifest("r", ROW.digest, ROW, t)
    cache.put_tag("r", "v1", ROW, 100.0, t)
    cache.put_tag("r", "v2", ROW, 100.0, t)
    cache.put_tag("s", "v1", ROW, 100.0, t)
    cache.put_body(ROW.digest, b"{}")
    cache.forget(tags_of=["r"])
    assert cache.tag("r", "v1", 100.0) is None and cache.tag("r", "v2", 100.0) is None
    assert cache.tag("s", "v1", 100.0) == ROW
    assert cache.manifest("r", ROW.digest) == ROW and cache.body(ROW.digest) == b"{}"
    cache.forget(manifests=[("r", ROW.digest)], bodies=[ROW.digest])
    assert cache.manifest("r", ROW.digest) is None and cache.body(ROW.digest) is None
    cache.forget(everything=True)
    assert cache.tag("s", "v1", 100.0) is None


def test_a_cached_tag_is_believed_for_a_second_only() -> None:
    cache = LookupCache()
    cache.put_tag("r", "v1", ROW, 100.0, cache.ticket())
    assert cache.tag("r", "v1", 100.0 + TAG_CACHE_SECONDS / 2) == ROW
    assert cache.tag("r", "v1", 100.0 + TAG_CACHE_SECONDS) is None


def test_lru_bounds_entries_and_weight() -> None:
    lru: LRU[str, bytes] = LRU(3, max_weight=10)
    for k in "abc":
        lru.put(k, b"x", 1)
    assert lru.get("a") == b"x"  # a is now the most recent
    lru.put("d", b"x", 1)
    assert lru.get("b") is None and len(lru) == 3
    lru.put("big", b"y" * 9, 9)
    assert lru.weight <= 10 and lru.get("big") is not None
