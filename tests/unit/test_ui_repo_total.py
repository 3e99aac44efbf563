"""The repository list filtered by project counts nothing when every repository holding
content is the project's (a host's usual one project): the index's running total is the
answer; with other projects beside it, it counts the project's (regproxy.ui.queries)."""

from __future__ import annotations

from pathlib import Path

from regproxy.index import Index, ManifestRecord
from regproxy.ui import queries


def _add(ix: Index, repo: str, i: int) -> None:
    ix.ensure_repo(repo, "docker.io", repo.split("/", 2)[-1])
    rec = ManifestRecord(
        f"sha256:{i:064x}",
        "application/vnd.oci.image.manifest.v1+json",
        10,
        None,
        None,
        None,
        [],
        [],
    )
    ix.add_manifest(repo, rec, tag="v1")


def _page(ix: Index, project: str) -> tuple[int, list[str]]:
    statements: list[str] = []
    ix.db.set_trace_callback(statements.append)
    try:
        page = queries.repositories(ix, project=project, q=None, limit=5)
    finally:
        ix.db.set_trace_callback(None)
    return page.total, [s for s in statements if "count(*) FROM repos" in s]


def test_one_project_takes_the_running_total_others_are_counted(tmp_path: Path) -> None:
    ix = Index(tmp_path / "index.db")
    ix.open()
    try:
        for i in range(12):
            _add(ix, f"spectro-images/docker.io/team/r{i:02d}", i)
        # a repository of another project that holds nothing any more is not one of the list
        _add(ix, "aaa/docker.io/team/gone", 100)
        assert ix.delete_manifest("aaa/docker.io/team/gone", f"sha256:{100:064x}")
        _add(ix, "spectro-images0/docker.io/team/x", 101)  # a name just past the range
        assert ix.delete_manifest("spectro-images0/docker.io/team/x", f"sha256:{101:064x}")
        assert _page(ix, "spectro-images") == (12, [])
        assert _page(ix, "nothing-here")[0] == 0
        for repo, i in (("zzz/docker.io/team/y", 102), ("aaa/docker.io/team/z", 103)):
            _add(ix, repo, i)
            total, counted = _page(ix, "spectro-images")
            assert total == 12 and counted, repo
            assert _page(ix, repo.split("/")[0])[0] == 1
    finally:
        ix.close()
