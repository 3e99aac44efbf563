"""The eviction plan on a hand-made index snapshot (regproxy.evict.plan is pure)."""

from __future__ import annotations

from regproxy.evict import pinned_closure, plan
from regproxy.index import UsageSnapshot

NOW = 10_000.0


def snapshot() -> UsageSnapshot:
    # r/a: m1 -> b1, b2 (oldest) ; r/b: m2 -> b2, b3 ; r/p: m3 pinned -> b4, b1
    # r/i: index i1 -> c1 (b5), c2 (b6); the children are rows of r/i too; loose blob b7
    rows = [
        ("r/a", "m1", 100.0, False),
        ("r/b", "m2", 200.0, False),
        ("r/p", "m3", 50.0, True),
        ("r/i", "i1", 300.0, False),
        ("r/i", "c1", 150.0, False),
        ("r/i", "c2", 160.0, False),
    ]
    manifests = {d: (10, None, 1.0) for d in ("m1", "m2", "m3", "i1", "c1", "c2")}
    manifests["sig"] = (5, "m2", 1.0)
    rows.append(("r/b", "sig", 20.0, False))  # a referrer of m2: goes with m2
    refs = [
        ("m1", "b1", "blob"),
        ("m1", "b2", "blob"),
        ("m2", "b2", "blob"),
        ("m2", "b3", "blob"),
        ("m3", "b4", "blob"),
        ("m3", "b1", "blob"),
        ("i1", "c1", "manifest"),
        ("i1", "c2", "manifest"),
        ("c1", "b5", "blob"),
        ("c2", "b6", "blob"),
    ]
    blobs = {f"b{i}": (1000 * i, 10.0) for i in range(1, 8)}
    return UsageSnapshot(rows, manifests, refs, blobs)


def test_pinned_closure_and_bytes() -> None:
    snap = snapshot()
    assert pinned_closure(snap) == {"m3", "b4", "b1"}
    assert plan(snap, 0, now=NOW).pinned_bytes == 10 + 4000 + 1000


def test_lru_unit_goes_with_exclusive_blobs_only() -> None:
    p = plan(snapshot(), 1, now=NOW, loose_age=1e9)
    assert p.rows == [("r/a", "m1")]
    # b1 is kept by the pinned m3, b2 by m2: only the manifest file goes
    assert p.manifests == ["m1"] and p.blobs == []
    assert p.freed == 10


def test_index_goes_with_children_and_referrer_with_subject() -> None:
    p = plan(snapshot(), 10**9, now=NOW, loose_age=1e9)
    assert sorted(p.rows) == sorted(
        [
            ("r/a", "m1"),
            ("r/b", "m2"),
            ("r/b", "sig"),
            ("r/i", "i1"),
            ("r/i", "c1"),
            ("r/i", "c2"),
        ]
    )
    assert "m3" not in p.manifests and "b4" not in p.blobs and "b1" not in p.blobs
    assert sorted(p.blobs) == ["b2", "b3", "b5", "b6"]
    assert p.short > 0
    assert [e.digest for e in p.evicted] == ["m1", "m2", "i1"]  # by last access


def test_recent_and_busy_are_kept_and_loose_blobs_age() -> None:
    snap = snapshot()
    p = plan(snap, 10**9, now=205.0, in_use=10.0, loose_age=1e9)
    assert {r for r, _ in p.rows} == {"r/a"}  # m2 was used 5 s ago, i1 later still
    p = plan(snap, 10**9, now=NOW, busy={"b5"}, loose_age=1e9)
    assert {r for r, _ in p.rows} == {"r/a", "r/b"}  # i1's child c1 needs b5: being fetched
    p = plan(snap, 10**9, now=NOW, loose_age=100.0)
    assert "b7" in p.blobs  # no manifest references it, and it is old
    p = plan(snap, 10**9, now=NOW, loose_age=NOW)
    assert "b7" not in p.blobs
