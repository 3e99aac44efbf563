"""benchmarks/bench_scale's deep listing page stays inside the listing at every scale."""

from __future__ import annotations

from benchmarks.bench_scale import deep_page


def test_the_deep_page_is_page_500_or_the_last_and_starts_inside_the_listing() -> None:
    for count in (1, 19, 20, 21, 99, 100, 101, 499, 2000, 10_000, 50_001, 60_000):
        names = [f"repo-{i:06d}" for i in range(count)]
        for per_page in (20, 100):
            deep = deep_page(names, per_page)
            pages = -(-count // per_page)
            if pages < 2:
                assert deep is None, (count, per_page)
                continue
            assert deep is not None
            page, last = deep
            assert page == min(500, pages), (count, per_page)
            assert last == names[(page - 1) * per_page - 1]  # the page after it is not empty
