"""A repository's tags over HTTP (an in-process daemon on 127.0.0.1): more tags than a page,
walked page by page in every order through the JSON API's ``next``/``prev`` and the page's
links; a key the page did not make is a 400 page, never a 500."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from regproxy.index import Index, ManifestRecord
from regproxy.store import Store
from regproxy.tag_order import tag_order
from tests.integration.test_ui_http import REPO, _client, login

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
T0 = 1_700_000_000.0


def _fill(root: Path, n: int) -> dict[str, tuple[float, float, float]]:
    """``n`` tags over n // 2 manifests (two tags share each one's times), some times equal,
    a third never pulled; tag -> (updated, cached, last access)."""
    root.mkdir(parents=True, exist_ok=True)
    Store(root).open()
    ix = Index(root / "index.db")
    ix.open()
    facts: dict[str, tuple[float, float, float]] = {}
    try:
        ix.ensure_repo(REPO, "docker.io", "team/app")
        for i in range(n):
            m = i // 2
            digest = f"sha256:{m:064x}"
            rec = ManifestRecord(
                digest, "application/vnd.oci.image.manifest.v1+json", 500, None, None, None, [], []
            )
            tag = f"{'v' if i % 3 else 'rc'}{i % 11}.{i}"
            ix.add_manifest(REPO, rec, tag=tag)
            created, updated = T0 + (m % 7), T0 + (i % 5)
            access = created + (0 if m % 3 == 0 else m % 4)
            ix.db.execute("UPDATE tags SET updated=? WHERE repo=? AND tag=?", (updated, REPO, tag))
            ix.db.execute(
                "UPDATE repo_manifests SET created=?, last_access=? WHERE repo=? AND digest=?",
                (created, access, REPO, digest),
            )
            facts[tag] = (updated, created, access)
    finally:
        ix.close()
    return facts


def _expected(sort: str, facts: dict[str, tuple[float, float, float]]) -> list[str]:
    def key(t: str) -> Any:
        updated, cached, access = facts[t]
        name = (tag_order(t), t)
        if sort == "updated":
            return (-updated, *name)
        if sort == "cached":
            return (-cached, *name)
        if sort == "pulled":
            return (0, -access, *name) if access > cached else (1, 0, *name)
        return name

    return sorted(facts, key=key)


async def test_tags_walked_page_by_page_in_every_order(tmp_path: Path) -> None:
    root = tmp_path / "store"
    facts = _fill(root, 45)
    client = await _client(root)
    try:
        assert (await login(client)).status == 303
        api = f"/ui/api/repositories/{REPO}/tags"
        for sort in ("name", "updated", "cached", "pulled"):
            expected = _expected(sort, facts)
            seen: list[str] = []
            body = await (await client.get(f"{api}?sort={sort}&per_page=10")).json()
            assert body["prev"] is None and (body["total"], body["pages"]) == (45, 5)
            bodies = [body]
            while True:
                seen += [t["tag"] for t in body["tags"]]
                if body["next"] is None:
                    break
                page = body["page"] + 1
                url = f"{api}?sort={sort}&per_page=10&after={quote(body['next'])}&page={page}"
                body = await (await client.get(url)).json()
                bodies.append(body)
            assert seen == expected, sort
            assert [b["page"] for b in bodies] == [1, 2, 3, 4, 5]
            back = await (
                await client.get(f"{api}?sort={sort}&per_page=10&before={quote(body['prev'])}")
            ).json()
            assert [t["tag"] for t in back["tags"]] == expected[30:40], sort

            # the page: its Next link leads on, page after page, to the same tags
            url: str | None = f"/ui/repositories/{REPO}?sort={sort}&per_page=10"
            shown: list[str] = []
            for _ in range(10):
                assert url is not None
                text = await (await client.get(url)).text()
                on_page = [t for t in expected if f">{t}<" in text]
                shown += sorted(on_page, key=lambda t, x=text: x.index(f">{t}<"))
                nxt = re.search(r'href="([^"]*)" rel="next"', text)
                url = html.unescape(nxt[1]) if nxt else None
                if url is None:
                    break
            assert shown == expected, sort
    finally:
        await client.close()


async def test_a_key_the_page_did_not_make_is_a_400(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _fill(root, 4)
    client = await _client(root)
    try:
        assert (await login(client)).status == 303
        for path in (
            f"/ui/api/repositories/{REPO}/tags?sort=updated&after=%5Bnot%20a%20key",
            f"/ui/api/repositories/{REPO}/tags?sort=pulled&before=%5B5%2C0%2C%22v1%22%5D",
            f"/ui/repositories/{REPO}?sort=cached&after=%5BNaN%2C%22v1%22%5D",
            "/ui/api/repositories?sort=size&after=%5Bnot%20a%20key",
            "/ui/repositories?sort=pulled&before=%7B%7D",
            # a lone surrogate, by JSON's escape: UTF-8 cannot hold it (a 500 before)
            f"/ui/api/repositories/{REPO}/tags?sort=updated&after=%5B-1%2C%22%5Cud800%22%5D",
            f"/ui/repositories/{REPO}?sort=pulled&before=%5B0%2C-5%2C%22%5Cudfff%22%5D",
            "/ui/api/repositories?sort=size&after=%5B1%2C%22%5Cud800%22%5D",
            "/ui/repositories?sort=pulled&after=%5B0%2C1%2C%22%5Cud800%22%5D",
        ):
            resp = await client.get(path)
            assert resp.status == 400, path
            assert "not a key" in await resp.text(), path
        # by name any text is a place in the list
        resp = await client.get(f"/ui/api/repositories/{REPO}/tags?after=%5Bnot%20a%20key")
        assert resp.status == 200
    finally:
        await client.close()
