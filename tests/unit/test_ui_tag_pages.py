"""A repository's tags in name order (numbers as numbers), page by page in both directions:
every tag once, in order, whatever names sit at the edges of the pages (regproxy.ui.queries)."""

from __future__ import annotations

import random
from pathlib import Path

from regproxy.index import Index, ManifestRecord
from regproxy.ui import queries

REPO = "spectro-images/docker.io/team/app"


def store(path: Path, tags: list[str], pinned: set[str]) -> Index:
    ix = Index(path)
    ix.open()
    ix.ensure_repo(REPO, "docker.io", "team/app")
    for i, tag in enumerate(tags):
        digest = f"sha256:{i:064x}"
        rec = ManifestRecord(
            digest, "application/vnd.oci.image.manifest.v1+json", 100 + i, None, None, None, [], []
        )
        ix.add_manifest(REPO, rec, tag=tag, pinned=tag in pinned)
    return ix


def test_tag_pages_cover_every_tag_once_in_natural_order(tmp_path: Path) -> None:
    rnd = random.Random(3)
    tags = ["1.9", "1.10", "1.01", "1.1", "01.1", "latest", "v2", "v10", "a", "a1", "ab"]
    tags += [f"{rnd.randint(0, 30)}.{rnd.randint(0, 12)}-{rnd.choice('abc')}" for _ in range(60)]
    tags = sorted(set(tags))
    pinned = set(rnd.sample(tags, 17))
    ix = store(tmp_path / "index.db", tags, pinned)
    ordered = sorted(tags, key=queries.tag_key)
    assert ordered.index("1.9") < ordered.index("1.10") < ordered.index("latest")
    assert ordered.index("01.1") < ordered.index("1.01") < ordered.index("1.1")  # ties: by name
    try:
        for show, want in (("all", tags), ("pinned", [t for t in tags if t in pinned])):
            expected = sorted(want, key=queries.tag_key)
            seen: list[str] = []
            after: str | None = None
            pages: list[queries.Page[queries.TagRow]] = []
            for _ in range(20):
                page = queries.repo_tags(ix, REPO, limit=7, after=after, show=show)
                assert page.total == len(expected)
                pages.append(page)
                seen += [t.tag or "" for t in page.rows]
                if page.next_after is None:
                    break
                after = page.next_after
            assert seen == expected, show
            # and back from the last page, by the previous page's key each time
            page = pages[-1]
            back = [t.tag or "" for t in page.rows]
            while page.prev_before is not None:
                page = queries.repo_tags(ix, REPO, limit=7, before=page.prev_before, show=show)
                back = [t.tag or "" for t in page.rows] + back
            assert back == expected, show
        # the sizes of the rows shown are their manifests' (what the store holds)
        first = queries.repo_tags(ix, REPO, limit=3)
        assert [t.size for t in first.rows] == [100 + tags.index(t.tag or "") for t in first.rows]
    finally:
        ix.close()
