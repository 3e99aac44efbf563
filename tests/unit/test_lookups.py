"""The registry's lookup cache: bounded, one invalidation API, no stale re-fill after a change."""

from __future__ import annotations

import gc

from regproxy.index import ManifestRow
from regproxy.lookups import (
    FORGETS_KEPT,
    FORGOTTEN_KEYS_KEPT,
    LRU,
    TAG_CACHE_SECONDS,
    LookupCache,
)

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
    lru: LRU[str, bytes] = LRU(3, max_weight=10, weigh=len)
    for k in "abc":
        lru.put(k, b"x")
    assert lru.get("a") == b"x"  # a is now the most recent
    lru.put("d", b"x")
    assert lru.get("b") is None and len(lru) == 3
    lru.put("big", b"y" * 9)
    assert lru.weight <= 10 and lru.get("big") is not None
    lru.put("big", b"z")  # replaced: its old weight goes
    lru.pop("d")
    assert lru.weight == sum(len(v) for v in (lru.get(k) for k in ("a", "big")) if v)


def test_tags_are_believed_on_while_confirmations_find_the_index_unchanged() -> None:
    """A tag is believed for TAG_CACHE_SECONDS after its read, and beyond while confirmations
    vouch for it: only for tags read since the confirmations (re)started."""
    cache = LookupCache()
    t = cache.ticket()
    cache.put_tag("r", "old", ROW, 100.0, t)  # read before the confirmations started
    cache.restart_tags(100.5)
    cache.put_tag("r", "new", ROW, 100.6, t)
    cache.confirm_tags(105.0)  # nothing changed elsewhere up to then
    assert cache.tag("r", "new", 105.9) == ROW
    assert cache.tag("r", "old", 105.9) is None  # its own second is over, and not vouched for
    assert cache.tag("r", "new", 106.0 + TAG_CACHE_SECONDS) is None  # no confirmation since
    cache.confirm_tags(103.0)  # a late check never moves the confirmation back
    assert cache.tag("r", "new", 105.9) == ROW
    cache.restart_tags(106.0)  # the index changed elsewhere: start over
    assert cache.tag("r", "new", 106.5) is None
    cache.forget(all_tags=True)
    assert cache.tag("r", "new", 100.7) is None


def test_a_forget_refuses_only_the_answers_of_the_keys_it_named() -> None:
    """An eviction batch forgets what it removed: a lookup of something else out meanwhile is
    still cached (a warming cache is not thrown away batch by batch), one of a named key, a
    tag of a named repository, or anything after ``everything`` is not."""
    cache = LookupCache()
    t = cache.ticket()
    cache.forget(links=[("r", "gone")], manifests=[("r", "gone")], tags=[("r", "v0")])
    cache.put_link("r", "kept", 1, t)
    cache.put_manifest("r", "kept", ROW, t)
    cache.put_tag("r", "v1", ROW, 100.0, t)
    cache.put_link("r", "gone", 1, t)
    cache.put_manifest("r", "gone", ROW, t)
    cache.put_tag("r", "v0", ROW, 100.0, t)
    assert cache.link("r", "kept") == 1 and cache.manifest("r", "kept") == ROW
    assert cache.tag("r", "v1", 100.0) == ROW
    assert cache.link("r", "gone") is None and cache.manifest("r", "gone") is None
    assert cache.tag("r", "v0", 100.0) is None
    # a link and a manifest row of the same (repo, digest) are different keys
    t = cache.ticket()
    cache.forget(links=[("r", "m")])
    cache.put_manifest("r", "m", ROW, t)
    assert cache.manifest("r", "m") == ROW
    for wildcard in ({"tags_of": ["r"]}, {"all_tags": True}):
        t = cache.ticket()
        cache.forget(**wildcard)  # type: ignore[arg-type]
        cache.put_tag("r", "v2", ROW, 100.0, t)
        cache.put_tag("s", "v2", ROW, 100.0, t)
        assert cache.tag("r", "v2", 100.0) is None
        assert (cache.tag("s", "v2", 100.0) is None) == ("all_tags" in wildcard)
    t = cache.ticket()
    cache.forget(everything=True)
    cache.put_link("r", "x", 1, t)
    assert cache.link("r", "x") is None


def test_a_lookup_out_across_more_forgets_than_are_kept_is_not_cached() -> None:
    cache = LookupCache()
    t = cache.ticket()
    for i in range(FORGETS_KEPT):
        cache.forget(links=[("r", f"other{i}")])
    cache.put_link("r", "d", 1, t)
    assert cache.link("r", "d") == 1  # every forget since is still known
    t = cache.ticket()
    for i in range(FORGETS_KEPT + 1):
        cache.forget(links=[("r", f"other{i}")])
    cache.put_link("r", "e", 1, t)
    assert cache.link("r", "e") is None  # the first forgets since are no longer known
    t = cache.ticket()
    cache.forget(links=[("r", f"k{i}") for i in range(FORGOTTEN_KEYS_KEPT + 1)])
    cache.put_link("r", "f", 1, t)
    assert cache.link("r", "f") is None  # too many keys to keep: not known either


def test_cached_rows_come_back_equal_and_stay_out_of_the_garbage_collectors_walks() -> None:
    """100,000 cached rows must not lengthen every full collection (a pause of the event loop
    and every thread): once collections have seen them, they are no longer tracked."""
    cache = LookupCache()
    rows = [
        ManifestRow(
            f"sha256:{i:064x}",
            "application/vnd.oci.image.manifest.v1+json",
            1000 + i,
            "application/vnd.example" if i % 2 else None,
            f"sha256:{i + 1:064x}" if i % 3 else None,
            {"org.opencontainers.image.created": str(i)} if i % 2 else None,
            float(i),
        )
        for i in range(1000)
    ]
    for _ in range(3):
        gc.collect()
    before = len(gc.get_objects())
    for i, row in enumerate(rows):
        cache.put_manifest("repo", row.digest, row, cache.ticket())
        cache.put_tag("repo", f"v{i}", row, 0.0, cache.ticket())
    for i, row in enumerate(rows):
        assert cache.manifest("repo", row.digest) == row
        assert cache.tag("repo", f"v{i}", 0.5) == row
    del rows, row
    for _ in range(4):  # a tuple is left out once every tuple inside it was
        gc.collect()
    assert len(gc.get_objects()) - before < 50  # not 2,000 rows and 1,000 tag entries
