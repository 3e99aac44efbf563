"""What the web page says, page by page, as an operator reads it (in-process daemon on 127.0.0.1):
units as configured, words in the singular, numbers sorted as numbers, errors in the layout."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import aiohttp
import pytest

from regproxy.ui.charts import chart
from tests.images import OCI_MANIFEST, make_image, make_index, write_layout
from tests.uiclient import AUTH, get_json, login, post, push, put_manifest, start

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
REPO = "spectro-images/team/app"


async def test_sizes_words_and_sort_order(tmp_path: Path) -> None:
    client = await start(
        tmp_path / "store",
        storage={"max_size": "100MB"},
        upstreams={"127.0.0.1:5095": {"url": "http://127.0.0.1:5095"}},
    )
    try:
        csrf = await login(client)
        img = make_image()
        for tag in ("1.9", "1.10", "1.2", "latest"):
            await push(client, REPO, tag, img)
        page = await (await client.get("/ui/")).text()
        assert "100 MB" in page and "95.4 MiB" in page  # as configured, then in binary units
        assert re.search(r'id="repo-count">1</a> <span class="unit">repository<', page)
        assert "sync off" in page and "not asked yet" not in page  # sync is off here
        overview = await get_json(client, "/ui/api/overview")
        assert overview["store"]["limit_configured"] == "100 MB"
        assert overview["store"]["limit"] == 100_000_000

        tags = await get_json(client, f"/ui/api/repositories/{REPO}/tags")
        assert [t["tag"] for t in tags["tags"]] == ["1.2", "1.9", "1.10", "latest"]
        text = await (await client.get("/ui/repositories?q=team/app")).text()
        assert "1 repository" in text and "1 repositories" not in text

        # an untagged manifest: its own type, and a state
        resp = await post(client, "/ui/delete", csrf=csrf, repo=REPO, ref="1.2", confirm="1")
        assert resp.status == 200
        for tag in ("1.9", "1.10", "latest"):
            await post(client, "/ui/delete", csrf=csrf, repo=REPO, ref=tag, confirm="1")
        tags = await get_json(client, f"/ui/api/repositories/{REPO}/tags")
        (row,) = tags["untagged"]
        assert row["media_type"] == OCI_MANIFEST and row["artifact_type"] is None
        page = await (await client.get(f"/ui/repositories/{REPO}")).text()
        untagged = page[page.index('id="untagged"') :]
        assert "OCI manifest" in untagged and "image.config" not in untagged
        assert 'class="pill ok">pinned<' in untagged
    finally:
        await client.close()


async def test_an_index_shows_each_platform_with_its_whole_size_and_the_image_config(
    tmp_path: Path,
) -> None:
    client = await start(tmp_path / "store")
    try:
        await login(client)
        a, b = make_image("amd64", layer_sizes=(5000,)), make_image("arm64", layer_sizes=(9000,))
        for img in (a, b):
            await push(client, REPO, img.digest.replace(":", "-"), img)
        digest = await put_manifest(client, REPO, "multi", make_index({"amd64": a, "arm64": b}))
        m = await get_json(client, f"/ui/api/manifests/{REPO}@{digest}")
        sizes = {p["platform"]: p["size"] for p in m["platforms"]}
        for arch, img in (("amd64", a), ("arm64", b)):
            whole = len(img.manifest) + len(img.config) + sum(len(x) for x in img.layers)
            assert sizes[f"linux/{arch}"] == whole
        one = await get_json(client, f"/ui/api/manifests/{REPO}@{a.digest}")
        assert one["image"]["cmd"] == ["/bin/true"] and one["image"]["platform"] == "linux/amd64"
        commands = {c["label"]: c["command"] for c in one["pull"]}
        host = f"127.0.0.1:{client.server.port}"
        assert commands["docker"] == f"docker pull {host}/{REPO}@{a.digest}"
        assert commands["skopeo"].startswith(f"skopeo copy --src-tls-verify=false docker://{host}/")
        tags = await get_json(client, f"/ui/api/repositories/{REPO}/tags")
        multi = next(t for t in tags["tags"] if t["tag"] == "multi")
        assert any(c["command"] == f"docker pull {host}/{REPO}:multi" for c in multi["pull"])
        page = await (await client.get(f"/ui/manifests/{REPO}@{a.digest}")).text()
        assert 'id="image"' in page and "/bin/true" in page and 'class="copy"' in page
    finally:
        await client.close()


async def test_errors_have_the_layout_and_the_host_port_form_is_found(tmp_path: Path) -> None:
    client = await start(
        tmp_path / "store", upstreams={"127.0.0.1:5095": {"url": "http://127.0.0.1:5095"}}
    )
    try:
        await login(client)
        img = make_image()
        name = "spectro-images/127.0.0.1_5095/team/web"
        await push(client, name, "v1", img)
        for path in (
            "/ui/repositories/127.0.0.1:5095/team/web",
            f"/ui/repositories/{name}",
            f"/ui/manifests/127.0.0.1:5095/team/web@{img.digest}",
        ):
            resp = await client.get(path)
            assert resp.status == 200, path
            assert name in await resp.text()
        for path, status, words in (
            ("/ui/repositories/spectro-images/no/such", 404, "Not found"),
            ("/ui/manifests/spectro-images/team/web@latest", 404, "REPOSITORY@DIGEST"),
            (f"/ui/manifests/{name}@sha256:{'0' * 64}", 404, "is not in the store"),
            ("/ui/nothing-here", 404, "no page /ui/nothing-here"),
        ):
            resp = await client.get(path)
            text = await resp.text()
            assert resp.status == status, path
            assert "<header" in text and 'role="alert"' in text and words in text, path
        resp = await client.get("/ui/logout")  # a GET: a page with the button, not a 405
        assert resp.status == 200 and 'id="logout-confirm"' in await resp.text()
        resp = await client.get("/ui/api/repositories/spectro-images/no/such/tags")
        assert resp.status == 404 and "no repository" in (await resp.json())["error"]
    finally:
        await client.close()


async def test_a_failed_upload_names_the_file_not_the_server_path(tmp_path: Path) -> None:
    client = await start(tmp_path / "store")
    try:
        csrf = await login(client)
        form = aiohttp.FormData()
        form.add_field("csrf", csrf)
        form.add_field("bundle", b"not a tar at all" * 100, filename="my-images.tar")
        resp = await client.post("/ui/upload", data=form, headers={"Accept": "application/json"})
        why = (await resp.json())["error"]
        assert resp.status == 400 and "my-images.tar" in why
        assert str(tmp_path) not in why and "/tmp/" not in why
        # an OCI layout whose image has no name: the form's field, not the CLI's option
        layout = tmp_path / "layout"
        write_layout(layout, {"v1": make_image()})
        index = json.loads((layout / "index.json").read_text())
        del index["manifests"][0]["annotations"]
        (layout / "index.json").write_text(json.dumps(index))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for item in sorted(layout.rglob("*")):
                tar.add(item, arcname=str(item.relative_to(layout)), recursive=False)
        form = aiohttp.FormData()
        form.add_field("csrf", csrf)
        form.add_field("bundle", buf.getvalue(), filename="unnamed.tar")
        resp = await client.post("/ui/upload", data=form)
        text = await resp.text()
        assert resp.status == 400 and "--name" not in text and "Name field" in text, text[-600:]
    finally:
        await client.close()


def test_the_chart_says_no_peak_when_empty_and_each_bar_its_value_and_time() -> None:
    empty = chart([], 1_000_000.0)
    assert empty["empty"] and empty["peak"] is None
    t0 = 1_764_489_600.0  # 08:00 UTC
    bars = chart(
        [
            {
                "start": t0,
                "end": t0 + 600,
                "served_disk": 3 * 1024 * 1024,
                "fetched": 0.0,
                "hits": 1.0,
                "misses": 0.0,
            }
        ],
        t0 + 600,
    )
    assert bars["peak"] == "3.0 MiB"
    (bar,) = bars["disk"]
    assert bar["title"] == "08:00 to 08:10 UTC: 3.0 MiB served from disk"


async def test_one_project_skips_the_projects_list(tmp_path: Path) -> None:
    client = await start(tmp_path / "store")
    try:
        await login(client)
        await push(client, REPO, "v1", make_image())
        resp = await client.get("/ui/projects", allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "/ui/repositories?project=spectro-images"
        assert (await client.get("/ui/projects?all=1", allow_redirects=False)).status == 200
        page = await (await client.get("/ui/")).text()
        assert 'aria-current="page">Overview' in page
        assert 'aria-label="store used' in page  # the meter has a name
        assert '<th scope="col">' in await (await client.get(f"/ui/repositories/{REPO}")).text()
    finally:
        await client.close()


async def test_next_to_evict_lists_unpinned_content_least_recently_used_first(
    tmp_path: Path,
) -> None:
    client = await start(tmp_path / "store")
    try:
        csrf = await login(client)
        old, new, kept = make_image(), make_image(), make_image()
        for tag, img in (("old", old), ("new", new), ("kept", kept)):
            await push(client, REPO, tag, img)  # pushed: pinned
        assert (await get_json(client, "/ui/api/evict"))["next"] == []
        for tag in ("old", "new"):
            resp = await post(client, "/ui/unpin", csrf=csrf, repo=REPO, ref=tag)
            assert resp.status == 200
        # "new" was pulled since: "old" goes first
        resp = await client.get(f"/v2/{REPO}/manifests/new", headers=AUTH)
        assert resp.status == 200
        rows = (await get_json(client, "/ui/api/evict"))["next"]
        assert [(r["tags"], r["digest"]) for r in rows] == [
            (["old"], old.digest),
            (["new"], new.digest),
        ]
        size = len(old.manifest) + len(old.config) + sum(len(x) for x in old.layers)
        assert rows[0]["bytes"] == size and rows[0]["repository"] == REPO
        page = await (await client.get("/ui/evict")).text()
        assert old.digest[:19] in page and kept.digest[:19] not in page
    finally:
        await client.close()


async def test_an_image_config_of_any_shape_never_breaks_the_manifest_page(tmp_path: Path) -> None:
    """The config is a blob like any other: whoever pushed it (or the upstream it came from)
    chose its nesting and its types. The page shows what it can read, never a 500."""
    import dataclasses

    from tests.images import sha256

    client = await start(tmp_path / "store")
    try:
        await login(client)
        for i, config in enumerate(
            [
                b"[" * 500_000 + b"]" * 500_000,  # json.loads: RecursionError
                b'{"history": 5, "architecture": "amd64", "os": "linux"}',
                b'{"config": {"ExposedPorts": 7, "Labels": [1], "Env": "x"}}',
                b'{"history": [{"created": {"a": 1}}, 3], "config": 1}',
            ]
        ):
            img = make_image()
            m = json.loads(img.manifest)
            m["config"].update(digest=sha256(config), size=len(config))
            img = dataclasses.replace(img, config=config, manifest=json.dumps(m).encode())
            digest = await push(client, REPO, f"t{i}", img)
            data = await get_json(client, f"/ui/api/manifests/{REPO}@{digest}")
            assert data["config"]["digest"] == sha256(config)
            resp = await client.get(f"/ui/manifests/{REPO}@{digest}")
            assert resp.status == 200, (i, await resp.text())
        assert data["image"]["history"] == [
            {"created": "{'a': 1}", "created_by": "", "comment": "", "empty_layer": False}
        ]
    finally:
        await client.close()
