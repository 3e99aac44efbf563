"""A repository's tags, page by page in every order the page offers and in both directions:
every tag once, in order, whatever sits at the edges of the pages; each page read from an
index in its order (no sort of the repository's tags, no OFFSET); a key the page did not make
is refused (regproxy.ui.tag_list)."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from regproxy.index import Index, ManifestRecord
from regproxy.tag_order import tag_order
from regproxy.ui import tag_list
from regproxy.ui.queries import BadKey, Page, TagRow

REPO = "spectro-images/docker.io/team/app"
OTHER = "spectro-images/docker.io/team/other"
T0 = 1_700_000_000.0


def _record(i: int) -> ManifestRecord:
    digest = f"sha256:{i:064x}"
    return ManifestRecord(
        digest, "application/vnd.oci.image.manifest.v1+json", 100 + i, None, None, None, [], []
    )


def store(path: Path, tags: list[str], pinned: set[str]) -> Index:
    """One manifest per tag (sizes 100 + its place), ``pinned`` tags' manifests pinned."""
    ix = Index(path)
    ix.open()
    ix.ensure_repo(REPO, "docker.io", "team/app")
    for i, tag in enumerate(tags):
        ix.add_manifest(REPO, _record(i), tag=tag, pinned=tag in pinned)
    return ix


def walk(
    ix: Index,
    sort: str,
    show: str = "all",
    limit: int = 7,
    few: int = 0,
    only: list[str] | None = None,
) -> list[str]:
    """Every page forward by each page's ``next``, then back from the last by ``prev``; the
    tags of both walks must agree. ``few``: up to how many pinned tags are read whole (0: the
    pages walk the order's index)."""
    seen: list[str] = []
    pages: list[Page[TagRow]] = []
    after: str | None = None
    for _ in range(200):
        page = tag_list.repo_tags(
            ix, REPO, limit=limit, after=after, sort=sort, show=show, few=few, only=only
        )
        assert len(page.rows) <= limit
        pages.append(page)
        seen += [t.tag or "" for t in page.rows]
        if page.next_after is None:
            break
        after = page.next_after
    page = pages[-1]
    back = [t.tag or "" for t in page.rows]
    while page.prev_before is not None:
        page = tag_list.repo_tags(
            ix,
            REPO,
            limit=limit,
            before=page.prev_before,
            sort=sort,
            show=show,
            few=few,
            only=only,
        )
        assert len(page.rows) == limit  # a page back is a whole page
        back = [t.tag or "" for t in page.rows] + back
    assert back == seen, (sort, show)
    assert pages[0].total == len(seen), (sort, show)
    return seen


def test_tag_pages_cover_every_tag_once_in_natural_order(tmp_path: Path) -> None:
    rnd = random.Random(3)
    tags = ["1.9", "1.10", "1.01", "1.1", "01.1", "latest", "v2", "v10", "a", "a1", "ab"]
    tags += [f"{rnd.randint(0, 30)}.{rnd.randint(0, 12)}-{rnd.choice('abc')}" for _ in range(60)]
    tags = sorted(set(tags))
    pinned = set(rnd.sample(tags, 17))
    ix = store(tmp_path / "index.db", tags, pinned)
    ordered = sorted(tags, key=lambda t: (tag_order(t), t))
    assert ordered.index("1.9") < ordered.index("1.10") < ordered.index("latest")
    assert ordered.index("01.1") < ordered.index("1.01") < ordered.index("1.1")  # ties: by name
    try:
        assert walk(ix, "name") == ordered
        for few in (0, tag_list.FEW):
            assert walk(ix, "name", "pinned", few=few) == [t for t in ordered if t in pinned]
        assert walk(ix, "name", "cached") == [t for t in ordered if t not in pinned]
        # the sizes of the rows shown are their manifests' (what the store holds)
        first = tag_list.repo_tags(ix, REPO, limit=3)
        assert [t.size for t in first.rows] == [100 + tags.index(t.tag or "") for t in first.rows]
    finally:
        ix.close()


def _timed_store(path: Path) -> tuple[Index, dict[str, tuple[float, float, float, bool]]]:
    """60 manifests, 1 to 3 tags each (tags of a manifest share its times), many times equal
    (ties go by name), a third never pulled; another repository's tags around them. Returns
    tag -> (updated, cached, last access, pinned)."""
    rnd = random.Random(11)
    ix = Index(path)
    ix.open()
    for repo in (REPO, OTHER):
        ix.ensure_repo(repo, "docker.io", repo.rsplit("/", 2)[-2])
    facts: dict[str, tuple[float, float, float, bool]] = {}
    n = 0
    for i in range(60):
        created = T0 + rnd.choice([0, 5, 10, 15, 20])
        access = created + rnd.choice([0, 0, 1, 2, 3, 50])  # equal: never pulled
        pin = rnd.random() < 0.3
        for _ in range(rnd.randint(1, 3)):
            tag = f"{rnd.choice(['v', 'r', 'release-'])}{n % 13}.{n}"
            n += 1
            updated = T0 + rnd.choice([0, 1, 2, 30])
            ix.add_manifest(REPO, _record(i), tag=tag, pinned=pin)
            ix.db.execute("UPDATE tags SET updated=? WHERE repo=? AND tag=?", (updated, REPO, tag))
            facts[tag] = (updated, created, access, pin)
        ix.db.execute(
            "UPDATE repo_manifests SET created=?, last_access=? WHERE repo=? AND digest=?",
            (created, access, REPO, f"sha256:{i:064x}"),
        )
        ix.add_manifest(OTHER, _record(i), tag=f"o{i}")  # same manifests, another repository
    return ix, facts


ORDERS: dict[str, Callable[[str, tuple[float, float, float, bool]], Any]] = {
    "name": lambda t, f: (tag_order(t), t),
    "updated": lambda t, f: (-f[0], tag_order(t), t),
    "cached": lambda t, f: (-f[1], tag_order(t), t),
    "pulled": lambda t, f: (0, -f[2], tag_order(t), t) if f[2] > f[1] else (1, 0, tag_order(t), t),
}


@pytest.mark.parametrize("sort", list(ORDERS))
def test_each_order_pages_every_tag_once_in_order_both_ways(tmp_path: Path, sort: str) -> None:
    ix, facts = _timed_store(tmp_path / "index.db")
    try:
        expected = sorted(facts, key=lambda t: ORDERS[sort](t, facts[t]))
        for limit in (1, 4, 7):
            assert walk(ix, sort, limit=limit) == expected, limit
        pinned = [t for t in expected if facts[t][3]]
        for few in (0, 5, tag_list.FEW):  # walked, read whole
            for limit in (1, 4, 7):
                assert walk(ix, sort, "pinned", limit=limit, few=few) == pinned, (few, limit)
        assert walk(ix, sort, "cached") == [t for t in expected if not facts[t][3]]
        stale = expected[3:40:4]  # the list of tags served stale: read whole
        assert walk(ix, sort, limit=3, only=sorted(stale)) == stale
        stale_pinned = [t for t in stale if facts[t][3]]
        assert walk(ix, sort, "pinned", limit=2, only=sorted(stale)) == stale_pinned
        # what the rows say matches the order they came in
        rows = tag_list.repo_tags(ix, REPO, limit=500, sort=sort).rows
        for row in rows:
            updated, cached, access, pin = facts[row.tag or ""]
            assert (row.updated, row.cached, row.pinned) == (updated, cached, pin)
            assert row.last_access == (access if access > cached else None)
    finally:
        ix.close()


@pytest.mark.parametrize("sort", list(ORDERS))
def test_a_tag_added_or_removed_between_pages_moves_nothing_else(tmp_path: Path, sort: str) -> None:
    ix, facts = _timed_store(tmp_path / "index.db")
    try:
        expected = sorted(facts, key=lambda t: ORDERS[sort](t, facts[t]))
        one = tag_list.repo_tags(ix, REPO, limit=10, sort=sort)
        two = tag_list.repo_tags(ix, REPO, limit=10, sort=sort, after=one.next_after)
        seen = [t.tag for t in (*one.rows, *two.rows)]
        assert seen == expected[:20]
        gone_seen, gone_ahead = expected[5], expected[30]
        for tag in (gone_seen, gone_ahead, expected[19]):  # the page's key itself goes too
            assert ix.delete_tag(REPO, tag)
        ix.add_manifest(REPO, _record(200), tag="zz-new")
        after = two.next_after
        while after is not None:
            page = tag_list.repo_tags(ix, REPO, limit=10, sort=sort, after=after)
            seen += [t.tag for t in page.rows]
            after = page.next_after
        rest = [t for t in expected[20:] if t != gone_ahead]
        assert [t for t in seen if t != "zz-new"] == expected[:20] + rest
        assert seen.count("zz-new") <= 1  # after the key: on a later page; before it: not seen
    finally:
        ix.close()


@pytest.mark.parametrize(
    ("sort", "key"),
    [
        ("updated", "not json"),
        ("updated", "[1, 2, 3]"),
        ("updated", '["x", "v1"]'),
        ("updated", '[NaN, "v1"]'),
        ("updated", '[1e999, "v1"]'),
        ("updated", f'[{10**400}, "v1"]'),
        ("cached", '[true, "v1"]'),
        ("cached", '{"a": 1}'),
        ("pulled", '[2, 0, "v1"]'),
        ("pulled", "[0, 5, 7]"),
        ("pulled", '[-1.5, "v1"]'),
    ],
)
def test_a_key_the_page_did_not_make_is_refused(tmp_path: Path, sort: str, key: str) -> None:
    ix = store(tmp_path / "index.db", ["v1", "v2"], set())
    try:
        for where in ({"after": key}, {"before": key}):
            with pytest.raises(BadKey):
                tag_list.repo_tags(ix, REPO, limit=5, sort=sort, **where)
        # any text is a place in name order
        page = tag_list.repo_tags(ix, REPO, limit=5, after=key)
        assert all((tag_order(t.tag or ""), t.tag) > (tag_order(key), key) for t in page.rows)
    finally:
        ix.close()


def _plans(ix: Index, run: Callable[[], object]) -> list[tuple[str, list[str]]]:
    """The statements ``run`` makes the index execute, each with its query plan."""
    statements: list[str] = []
    ix.db.set_trace_callback(statements.append)
    try:
        run()
    finally:
        ix.db.set_trace_callback(None)
    plans = []
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT"):
            rows = ix.db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
            plans.append((sql, [str(r[3]) for r in rows]))
    return plans


@pytest.mark.parametrize("sort", list(ORDERS))
def test_each_order_reads_an_index_in_its_order_not_a_sort_of_every_tag(
    tmp_path: Path, sort: str
) -> None:
    ix, _ = _timed_store(tmp_path / "index.db")
    try:
        first = tag_list.repo_tags(ix, REPO, limit=7, sort=sort)
        assert first.next_after is not None
        for where in ({}, {"after": first.next_after}, {"before": first.next_after}):
            for show in ("all", "pinned"):

                def page(w: dict[str, str] = where, s: str = show) -> object:
                    return tag_list.repo_tags(ix, REPO, limit=7, sort=sort, show=s, few=0, **w)

                plans = _plans(ix, page)
                page_reads = [p for sql, p in plans if "ORDER BY" in sql]
                assert page_reads, plans
                for plan in page_reads:
                    text = " | ".join(plan)
                    # the first table by an index range in the repository, then lookups
                    assert plan[0].startswith("SEARCH") and "(repo=?" in plan[0], text
                    searches = [line for line in plan[1:] if not line.startswith("USE")]
                    assert all("digest=?" in line for line in searches), text
                    # the only sorting: the tags of the manifests of one time among
                    # themselves (per time, or the one time at the page's key)
                    tie = "created=?" in plan[0] or "last_access=?" in plan[0]
                    assert tie or "USE TEMP B-TREE FOR ORDER BY" not in text, text
    finally:
        ix.close()


def test_an_upgrade_from_v8_keys_the_tags_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "index.db"
    ix = store(path, ["1.10", "1.9", "latest", "1.9.1"], {"latest"})
    ix.close()
    db = sqlite3.connect(path, isolation_level=None)
    try:  # back to version 8: no key column, none of its indexes
        for name in ("tags_by_name", "tags_by_updated", "repo_manifests_created"):
            db.execute(f"DROP INDEX {name}")
        db.execute("DROP INDEX repo_manifests_pulled")
        db.execute("DROP INDEX tags_unsorted")  # version 10's
        db.execute("ALTER TABLE tags DROP COLUMN sortkey")
        db.execute("PRAGMA user_version = 8")
    finally:
        db.close()
    ix = Index(path)
    ix.open()
    try:
        page = tag_list.repo_tags(ix, REPO, limit=2)
        assert [t.tag for t in page.rows] == ["1.9", "1.9.1"]
        page = tag_list.repo_tags(ix, REPO, limit=2, after=page.next_after)
        assert [t.tag for t in page.rows] == ["1.10", "latest"] and page.next_after is None
        keys = dict(ix.db.execute("SELECT tag, sortkey FROM tags").fetchall())
        assert keys == {t: tag_order(t) for t in ("1.10", "1.9", "latest", "1.9.1")}
    finally:
        ix.close()


def test_tag_rows_an_older_daemon_wrote_without_a_key_get_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon of version 8 or older, running while a newer tool upgraded its store, writes
    tag rows without ``sortkey`` (from a review: they hid the rest of the name order behind
    them). Moving such a tag again keys it; the next writer's connection keys the rest, found
    through the partial index, without a scan."""
    path = tmp_path / "index.db"
    tags = [f"v{i}" for i in range(10)]
    ix = store(path, tags, set())
    old = sqlite3.connect(path, isolation_level=None)
    try:  # as version 8's add_manifest writes a tag: no sortkey
        for i, tag in enumerate(["z-old-1", "z-old-2", "z-old-3"]):
            old.execute(
                "INSERT INTO tags(repo, tag, digest, updated, checked) VALUES(?,?,?,?,?)",
                (REPO, tag, _record(i).digest, 5.0, 5.0),
            )
    finally:
        old.close()
    ix.add_manifest(REPO, _record(4), tag="z-old-1")  # moved again by today's code: keyed
    assert ix.db.execute("SELECT sortkey FROM tags WHERE tag='z-old-1'").fetchone()[0] is not None
    plan = " ".join(
        str(r[3])
        for r in ix.db.execute(
            "EXPLAIN QUERY PLAN UPDATE tags INDEXED BY tags_unsorted SET sortkey = x'00' "
            "WHERE sortkey IS NULL"
        )
    )
    assert "tags_unsorted" in plan, plan
    ix.close()
    with caplog.at_level("INFO", logger="regproxy.index"):
        ix = Index(path)
        ix.open()
    try:
        assert "index.tags_sorted" in caplog.text and "rows=2" in caplog.text
        expected = sorted([*tags, "z-old-1", "z-old-2", "z-old-3"], key=tag_order)
        assert walk(ix, "name", limit=2) == expected
        assert sorted(walk(ix, "updated", limit=2)) == sorted(expected)
    finally:
        ix.close()
