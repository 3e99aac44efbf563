"""The web page's "last pulled" laid over the index's rows: what was served since the last
write of access times (regproxy.ui.served), without waiting for that write."""

from __future__ import annotations

from regproxy.ui import served
from regproxy.ui.queries import RepoRow, TagRow


def repo(name: str, last: float | None) -> RepoRow:
    return RepoRow(name, None, name, 10.0, last, 1, 1, 0)


def tag(digest: str, cached: float, pulled: float | None) -> TagRow:
    return TagRow("v1", digest, "m", None, 0, cached, pulled, None, None, False)


def test_repository_rows_take_the_latest_time_served() -> None:
    rows = [repo("a", 50.0), repo("b", None), repo("c", 70.0)]
    unflushed = {("a", "d1"): 60.0, ("a", "d2"): 55.0, ("b", "d3"): 40.0, ("c", "d4"): 65.0}
    out = served.repos(rows, unflushed)
    assert [(r.name, r.last_access) for r in out] == [("a", 60.0), ("b", 40.0), ("c", 70.0)]
    assert served.repos(rows, {}) is rows


def test_a_tag_is_pulled_only_when_served_after_it_came() -> None:
    rows = [tag("d1", 100.0, None), tag("d2", 100.0, None), tag("d3", 100.0, 120.0)]
    unflushed = {("r", "d1"): 110.0, ("r", "d2"): 100.0, ("r", "d3"): 115.0, ("s", "d2"): 200.0}
    served.tags("r", rows, unflushed)
    assert [t.last_access for t in rows] == [110.0, None, 120.0]
    assert served.manifest("r", "d1", 100.0, None, unflushed) == 110.0
    assert served.manifest("r", "d2", 100.0, None, unflushed) is None  # its arrival, no pull
