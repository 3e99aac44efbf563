"""The web page over plain HTTP (an in-process daemon on 127.0.0.1): who gets in, CSRF, speed.

The browser tests are in test_ui_browser.py; these need no chromium.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.auth import FAILURE_DELAY
from regproxy.config import config_from_dict
from regproxy.deadline import DEFAULT_TIMING, Timing
from regproxy.index import Index
from regproxy.store import Store
from regproxy.web_keys import METRICS_KEY, REGISTRY_KEY
from tests.images import make_image
from tests.inproc import FakeTime

# api keeps per-request facts under plain string keys (request["error"]), as test_auth says
pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
PASSWORD = "s3cret-Pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
REPO = "spectro-images/docker.io/team/app"
FAKE_DIGEST = "sha256:" + "ab" * 32

PAGES = [
    "/ui",
    "/ui/",
    "/ui/projects",
    "/ui/repositories",
    "/ui/repositories?q=app&page=2",
    f"/ui/repositories/{REPO}",
    f"/ui/manifests/{REPO}@{FAKE_DIGEST}",
    "/ui/upload",
]
API = [
    "/ui/api/overview",
    "/ui/api/projects",
    "/ui/api/repositories?q=app",
    f"/ui/api/repositories/{REPO}/tags",
    f"/ui/api/manifests/{REPO}@{FAKE_DIGEST}",
]
POSTS = ["/ui/pin", "/ui/unpin", "/ui/delete", "/ui/upload", "/ui/logout"]


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _config(root: Path, users: bool = True) -> Any:
    raw: dict[str, Any] = {
        "storage": {"root": str(root)},
        "content": {"sync": {"enable": False}},
        "log": {"access": False},
    }
    if users:
        raw["auth"] = {"users": {"alice": HASH}}
    return config_from_dict(raw)


async def _client(
    root: Path, users: bool = True, timing: Timing = DEFAULT_TIMING
) -> TestClient[Any, Any]:
    app = create_app(_config(root, users), timing=timing)
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
def clock() -> FakeTime:
    """The app's clock: a wrong password's delay passes on it, not on the test's time."""
    return FakeTime()


@pytest.fixture
async def client(tmp_path: Path, clock: FakeTime) -> AsyncIterator[TestClient[Any, Any]]:
    c = await _client(tmp_path / "store", timing=clock.timing)
    yield c
    await c.close()


async def login(client: TestClient[Any, Any], password: str = PASSWORD) -> aiohttp.ClientResponse:
    page = await client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', await page.text())
    assert token is not None
    return await client.post(
        "/ui/login",
        data={"username": "alice", "password": password, "login_token": token[1], "next": "/ui/"},
        allow_redirects=False,
    )


async def csrf_of(client: TestClient[Any, Any]) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', await (await client.get("/ui/")).text())
    assert m is not None
    return m[1]


async def test_root_leads_to_the_page_and_v2_is_untouched(client) -> None:
    resp = await client.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui/"
    resp = await client.get("/v2/", allow_redirects=False)
    assert resp.status == 401  # users configured: the clients' ping asks for a login, as before
    assert "Basic" in resp.headers["WWW-Authenticate"]


async def test_every_page_and_json_route_refuses_anonymous_requests(client) -> None:
    for path in PAGES:
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/ui/login?next="), path
    for path in API:
        resp = await client.get(path, allow_redirects=False)
        assert resp.status == 401, path
        assert "WWW-Authenticate" not in resp.headers  # no browser password dialog
    for path in POSTS:
        resp = await client.post(path, data={"repo": REPO, "ref": "v1"}, allow_redirects=False)
        assert resp.status == 401, path
    # a session cookie that was never made is no session
    client.session.cookie_jar.update_cookies({"regproxy_session": "forged"})
    resp = await client.get("/ui/api/overview")
    assert resp.status == 401
    # the login form and the static files are open
    assert (await client.get("/ui/login")).status == 200
    assert (await client.get("/ui/static/ui.css")).status == 200


async def test_wrong_login_is_refused_slowly_and_counted_then_the_right_one_gets_in(
    client, clock: FakeTime
) -> None:
    metrics = client.server.app[METRICS_KEY]
    before = metrics.login_failures._value.get()
    t0 = clock.now()
    resp = await login(client, "wrong")
    assert resp.status == 401
    assert "Wrong user name or password" in await resp.text()
    assert clock.now() - t0 >= FAILURE_DELAY  # waited out on the app's clock
    assert metrics.login_failures._value.get() == before + 1
    assert "regproxy_session" not in {c.key for c in client.session.cookie_jar}

    resp = await login(client)
    assert resp.status == 303 and resp.headers["Location"] == "/ui/"
    cookie = next(
        v for k, v in resp.headers.items() if k == "Set-Cookie" and "regproxy_session" in v
    )
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert "Max-Age=43200" in cookie and "Secure" not in cookie  # no TLS here
    resp = await client.get("/ui/")
    assert resp.status == 200
    assert "Content-Security-Policy" in resp.headers
    text = await resp.text()
    assert "alice" in text and "Overview" in text
    for path in ("/ui/projects", "/ui/repositories", "/ui/upload", *API[:3]):
        assert (await client.get(path)).status == 200, path

    # a login form without its token (another site posting it) is refused
    resp = await client.post(
        "/ui/login", data={"username": "alice", "password": PASSWORD}, allow_redirects=False
    )
    assert resp.status == 403


async def test_posts_without_the_csrf_token_are_refused(client) -> None:
    assert (await login(client)).status == 303
    for path in POSTS:
        resp = await client.post(path, data={"repo": REPO, "ref": "v1"}, allow_redirects=False)
        assert resp.status == 403, path
        resp = await client.post(
            path, data={"repo": REPO, "ref": "v1", "csrf": "wrong"}, allow_redirects=False
        )
        assert resp.status == 403, path
    form = aiohttp.FormData()
    form.add_field("csrf", "wrong")
    form.add_field("bundle", b"not a bundle", filename="b.tar")
    resp = await client.post("/ui/upload", data=form)
    assert resp.status == 403
    # still logged in: nothing above logged out
    assert (await client.get("/ui/")).status == 200
    # the right token logs out, and then the pages are refused
    token = await csrf_of(client)
    resp = await client.post("/ui/logout", data={"csrf": token}, allow_redirects=False)
    assert resp.status == 303
    for path in PAGES:
        assert (await client.get(path, allow_redirects=False)).status == 303, path
    for path in API:
        assert (await client.get(path)).status == 401, path


async def test_basic_credentials_read_the_json_routes_only(client) -> None:
    good = basic("alice", PASSWORD)
    resp = await client.get("/ui/api/overview", headers=good)
    assert resp.status == 200
    body = await resp.json()
    assert body["sync"] is False and "store" in body and "cache" in body
    resp = await client.get("/ui/api/overview", headers=basic("alice", "nope"))
    assert resp.status == 401
    resp = await client.get("/ui/", headers=good, allow_redirects=False)
    assert resp.status == 303  # pages need the login form's session
    resp = await client.post("/ui/pin", data={"repo": REPO, "ref": "v1"}, headers=good)
    assert resp.status == 401


async def _push(client: TestClient[Any, Any], tag: str) -> str:
    img = make_image()
    auth = basic("alice", PASSWORD)
    for blob in (img.config, *img.layers):
        from tests.images import sha256

        resp = await client.post(
            f"/v2/{REPO}/blobs/uploads/?digest={sha256(blob)}", data=blob, headers=auth
        )
        assert resp.status == 201, await resp.text()
    resp = await client.put(
        f"/v2/{REPO}/manifests/{tag}",
        data=img.manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json", **auth},
    )
    assert resp.status == 201, await resp.text()
    return img.digest


async def test_tags_manifest_pin_unpin_delete_through_the_page(client) -> None:
    digest = await _push(client, "v1")
    assert (await login(client)).status == 303
    token = await csrf_of(client)
    text = await (await client.get(f"/ui/repositories/{REPO}")).text()
    assert "v1" in text and digest[:19] in text and "pinned" in text  # pushed: pinned
    tags = await (await client.get(f"/ui/api/repositories/{REPO}/tags")).json()
    (row,) = tags["tags"]
    assert row["tag"] == "v1" and row["digest"] == digest and row["pinned"] and row["size"] > 70_000
    m = await (await client.get(f"/ui/api/manifests/{REPO}@{digest}")).json()
    assert m["tags"] == ["v1"] and len(m["layers"]) == 2 and m["config"] is not None
    assert all(layer["held"] for layer in m["layers"])
    page = await client.get(f"/ui/manifests/{REPO}@{digest}")
    assert page.status == 200 and "Layers" in await page.text()

    resp = await client.post("/ui/unpin", data={"csrf": token, "repo": REPO, "ref": "v1"})
    assert resp.status == 200 and "Unpinned" in await resp.text()
    tags = await (await client.get(f"/ui/api/repositories/{REPO}/tags")).json()
    assert tags["tags"][0]["pinned"] is False
    resp = await client.post("/ui/pin", data={"csrf": token, "repo": REPO, "ref": digest})
    assert resp.status == 200 and "Pinned" in await resp.text()
    resp = await client.post("/ui/delete", data={"csrf": token, "repo": REPO, "ref": "v1"})
    assert resp.status == 200 and 'id="confirm-delete"' in await resp.text()  # asks first
    assert (await (await client.get(f"/ui/api/repositories/{REPO}/tags")).json())["tags"]
    resp = await client.post(
        "/ui/delete", data={"csrf": token, "repo": REPO, "ref": "v1", "confirm": "1"}
    )
    assert resp.status == 200 and "Deleted tag" in await resp.text()
    tags = await (await client.get(f"/ui/api/repositories/{REPO}/tags")).json()
    assert tags["tags"] == [] and tags["untagged"][0]["digest"] == digest
    resp = await client.post(
        "/ui/delete", data={"csrf": token, "repo": REPO, "ref": digest, "confirm": "1"}
    )
    assert resp.status == 200
    repos = await (await client.get("/ui/api/repositories")).json()
    assert repos["total"] == 0


async def test_no_users_configured_the_page_is_open_and_read_only(tmp_path: Path) -> None:
    client = await _client(tmp_path / "store", users=False)
    try:
        resp = await client.get("/ui/")
        assert resp.status == 200
        assert "No users are configured" in await resp.text()
        assert (await client.get("/ui/api/repositories")).status == 200
        for path in POSTS:
            resp = await client.post(path, data={"repo": REPO, "ref": "v1", "csrf": "x"})
            assert resp.status == 403, path
    finally:
        await client.close()


def _fill(root: Path, n: int) -> None:
    """n repositories (two projects), each with a manifest, a tag and a blob, straight into
    the index: what a big host's index holds, without the bytes."""
    root.mkdir(parents=True, exist_ok=True)
    Store(root).open()
    index = Index(root / "index.db")
    now = time.time()
    db = index.db
    db.execute("BEGIN")
    repos, manifests, rms, tags, blobs, rbs = [], [], [], [], [], []
    for i in range(n):
        project = "spectro-images" if i % 10 else "other-project"
        name = f"{project}/docker.io/team/repo-{i:05d}"
        digest = f"sha256:{i:064x}"
        blob = f"sha256:{i + 10**6:064x}"
        repos.append((name, "docker.io", f"team/repo-{i:05d}", now, now - i))
        manifests.append((digest, "application/vnd.oci.image.manifest.v1+json", 500, now))
        rms.append((name, digest, now, now, i % 2))
        tags.append((name, "v1", digest, now, now))
        blobs.append((blob, 1000 + i, now))
        rbs.append((name, blob))
    db.executemany(
        "INSERT INTO repos(name, host, path, created, last_access) VALUES(?,?,?,?,?)", repos
    )
    db.executemany(
        "INSERT INTO manifests(digest, media_type, size, created) VALUES(?,?,?,?)", manifests
    )
    db.executemany(
        "INSERT INTO repo_manifests(repo, digest, created, last_access, pinned) VALUES(?,?,?,?,?)",
        rms,
    )
    db.executemany("INSERT INTO tags(repo, tag, digest, updated, checked) VALUES(?,?,?,?,?)", tags)
    db.executemany("INSERT INTO blobs(digest, size, created) VALUES(?,?,?)", blobs)
    db.executemany("INSERT INTO repo_blobs(repo, digest) VALUES(?,?)", rbs)
    db.executemany(
        "INSERT INTO manifest_refs(parent, child, kind) VALUES(?,?,'blob')",
        [(m[0], b[0]) for m, b in zip(manifests, blobs, strict=True)],
    )
    db.execute("COMMIT")
    index.close()


async def test_ten_thousand_repositories_answer_fast_without_the_blob_tree(
    tmp_path: Path, monkeypatch
) -> None:
    root = tmp_path / "store"
    _fill(root, 10_000)

    def no_scan(*_a: object, **_k: object) -> None:
        raise AssertionError("the web page must not scan the blob tree")

    monkeypatch.setattr(Store, "iter_blobs", no_scan)
    monkeypatch.setattr(os, "walk", no_scan)
    monkeypatch.setattr(os, "scandir", no_scan)
    names = sorted(
        f"{'spectro-images' if i % 10 else 'other-project'}/docker.io/team/repo-{i:05d}"
        for i in range(10_000)
    )
    client = await _client(root)
    try:
        assert (await login(client)).status == 303
        # keyset pages: the 150th page is the 50 names after the 7450th, with links both ways
        page150 = f"/ui/api/repositories?after={quote(names[149 * 50 - 1])}&page=150"
        body = await (await client.get(page150)).json()
        assert [r["name"] for r in body["repositories"]] == names[149 * 50 : 150 * 50]
        assert (body["page"], body["pages"], body["total"]) == (150, 200, 10_000)
        assert body["next"] == names[150 * 50 - 1] and body["prev"] == names[149 * 50]
        back = await (
            await client.get(f"/ui/api/repositories?before={quote(body['prev'])}&page=149")
        ).json()
        assert [r["name"] for r in back["repositories"]] == names[148 * 50 : 149 * 50]
        last = await (
            await client.get(f"/ui/api/repositories?after={quote(names[-3])}&page=200")
        ).json()
        assert len(last["repositories"]) == 2 and last["next"] is None
        first = await (await client.get("/ui/api/repositories")).json()
        assert first["prev"] is None and first["page"] == 1
        checks = [
            (page150, lambda b: len(b["repositories"]) == 50),
            ("/ui/api/repositories?q=repo-0999", lambda b: b["total"] == 10),
            ("/ui/api/repositories?project=other-project&page=3", lambda b: b["total"] == 1000),
            ("/ui/api/projects", lambda b: len(b["projects"]) == 2),
            ("/ui/api/overview", lambda b: b["counts"]["repositories"] == 10_000),
        ]
        for path, ok in checks:
            resp = await client.get(path)
            assert resp.status == 200, path
            assert ok(await resp.json()), path
        page199 = f"/ui/repositories?after={quote(names[198 * 50 - 1])}&page=199"
        for path in (
            page199,
            "/ui/repositories?q=repo-09",
            "/ui/projects",
            "/ui/",
            "/ui/repositories/spectro-images/docker.io/team/repo-09999",
        ):
            resp = await client.get(path)
            assert resp.status == 200, path
        text = await (await client.get(page199)).text()
        assert "page 199 of 200" in text and "repo-09" in text
        assert "page=200" in text and "page=198" in text  # the links to the pages around it

        # by last pull (repo i pulled i seconds ago) and by size (1500 + i bytes): keyset pages
        # too, each after (or before) the key of a row of the page next to it
        def name(i: int) -> str:
            return f"{'spectro-images' if i % 10 else 'other-project'}/docker.io/team/repo-{i:05d}"

        for sort, order in (("pulled", range(10_000)), ("size", range(9_999, -1, -1))):
            expected = [name(i) for i in order]
            url = f"/ui/api/repositories?sort={sort}"
            one = await (await client.get(url)).json()
            assert [r["name"] for r in one["repositories"]] == expected[:50], sort
            two = await (await client.get(f"{url}&after={quote(one['next'])}&page=2")).json()
            assert [r["name"] for r in two["repositories"]] == expected[50:100], sort
            back = await (await client.get(f"{url}&before={quote(two['prev'])}&page=1")).json()
            assert [r["name"] for r in back["repositories"]] == expected[:50], sort
            assert back["prev"] is None and (two["page"], two["total"]) == (2, 10_000)
            odd = await client.get(f"{url}&after=%5Bnot%20a%20key")  # not one: 400, no 500
            assert odd.status == 400
    finally:
        await client.close()


async def test_plain_form_upload_without_javascript(client, tmp_path: Path) -> None:
    """The upload form posted as a browser without JavaScript does: multipart, csrf first."""
    import tarfile

    from tests.images import make_index, sha256, write_layout

    a, b = make_image("amd64"), make_image("arm64")
    index = make_index({"amd64": a, "arm64": b})
    layout = tmp_path / "layout"
    write_layout(layout, {"2": (index, [a, b])})
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tar:
        for p in sorted(layout.rglob("*")):
            tar.add(p, arcname=str(p.relative_to(layout)), recursive=False)
    assert (await login(client)).status == 303
    token = await csrf_of(client)
    form = aiohttp.FormData()
    form.add_field("csrf", token)
    form.add_field("name", "docker.io/team/multi")
    form.add_field("bundle", archive.read_bytes(), filename="bundle.tar")
    resp = await client.post("/ui/upload", data=form)
    text = await resp.text()
    assert resp.status == 200, text
    assert "Imported" in text and "spectro-images/docker.io/team/multi:2" in text
    digest = sha256(index)
    name = "spectro-images/docker.io/team/multi"
    tags = await (await client.get(f"/ui/api/repositories/{name}/tags")).json()
    assert tags["tags"][0]["platforms"] == ["linux/amd64", "linux/arm64"]
    assert tags["tags"][0]["pinned"] is True and tags["tags"][0]["digest"] == digest
    m = await (await client.get(f"/ui/api/manifests/{name}@{digest}")).json()
    assert [p["platform"] for p in m["platforms"]] == ["linux/amd64", "linux/arm64"]
    assert all(p["held"] for p in m["platforms"])
    page = await (await client.get(f"/ui/manifests/{name}@{digest}")).text()
    assert "Platforms" in page and "linux/arm64" in page
    # a damaged bundle is refused with the importer's message, and the page stays usable
    form = aiohttp.FormData()
    form.add_field("csrf", token)
    form.add_field("bundle", b"not a tar at all" * 100, filename="bad.tar")
    resp = await client.post("/ui/upload", data=form)
    assert resp.status == 400 and "upload-error" in await resp.text()
    # no room above storage.min_free: 507 with the reason on the page, before the file is read
    registry = client.server.app[REGISTRY_KEY]
    registry.uploads.space.disk = lambda: (100 * 2**30, 2**30)  # 1 GiB free, floor 5 GiB
    form = aiohttp.FormData()
    form.add_field("csrf", token)
    form.add_field("bundle", archive.read_bytes(), filename="bundle.tar")
    resp = await client.post("/ui/upload", data=form)
    text = await resp.text()
    assert resp.status == 507 and "upload-error" in text, text
    assert "insufficient storage" in text and "bytes more than there is room for" in text


#: bodies aiohttp cannot read as a form: a part header with no colon, a boundary that never
#: comes, an unknown charset or bytes it cannot decode, an unknown Content-Transfer-Encoding, a
#: file part cut before its end
MALFORMED = [
    ("multipart/form-data; boundary=xx", b"--xx\r\nbad header\r\n\r\nv\r\n--xx--\r\n"),
    ("multipart/form-data; boundary=xx", b"--yy\r\n\r\nv\r\n"),
    ("multipart/form-data", b"--xx\r\n\r\nv\r\n"),
    ("application/x-www-form-urlencoded; charset=no-such-charset", b"csrf=x"),
    ("application/x-www-form-urlencoded", b"csrf=\xff\xfe"),
    (
        "multipart/form-data; boundary=xx",
        b'--xx\r\nContent-Disposition: form-data; name="csrf"\r\n'
        b"Content-Transfer-Encoding: rot13\r\n\r\nv\r\n--xx--\r\n",
    ),
    (
        "multipart/form-data; boundary=xx",
        b'--xx\r\nContent-Disposition: form-data; name="bundle"; filename="b.tar"\r\n\r\nabc',
    ),
]


async def test_malformed_form_bodies_are_a_400_page_never_a_500(client) -> None:
    """Anonymous (the login form) and logged in (every POST route): a body that is not a form
    is answered with the page's 400, and the page goes on working."""
    for ctype, body in MALFORMED:
        resp = await client.post("/ui/login", data=body, headers={"Content-Type": ctype})
        assert resp.status == 400, (ctype, body, await resp.text())
        assert "malformed" in await resp.text()
    assert (await login(client)).status == 303
    for path in POSTS:
        for ctype, body in MALFORMED:
            headers = {"Content-Type": ctype}
            if path == "/ui/upload":  # its fields are read before the token is checked
                headers["X-CSRF-Token"] = await csrf_of(client)
            resp = await client.post(path, data=body, headers=headers, allow_redirects=False)
            assert resp.status in (400, 403), (path, ctype, body, await resp.text())
            if resp.status == 403:  # read as a form (an empty one): refused for its token
                assert "CSRF" in await resp.text(), (path, ctype, body)
    assert (await client.get("/ui/")).status == 200


async def test_a_form_body_larger_than_a_form_is_refused_unread(client) -> None:
    """The login form is open to anyone: its body may not hold the app's 8 MiB of memory."""
    big = {"username": "alice", "password": "x" * 100_000, "login_token": "t"}
    resp = await client.post("/ui/login", data=big)
    assert resp.status == 413

    async def chunked() -> AsyncIterator[bytes]:
        yield b"username=a"

    resp = await client.post(
        "/ui/login",
        data=chunked(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 413  # no declared length: a browser always sends one
    assert (await login(client)).status == 303  # a real form still gets in
    token = await csrf_of(client)
    resp = await client.post("/ui/pin", data={"csrf": token, "repo": "x" * 20_000, "ref": "v1"})
    assert resp.status == 413


async def test_last_pulled_keeps_what_was_served_when_its_write_lands_during_the_read(
    client,
) -> None:
    """A page lays what was served since access times were last written over the index's
    rows. The housekeeping's write of those times may land while the page reads the index,
    after the read's snapshot: what the page lays over is taken before the read, so those
    times are in one or the other (they were in neither: a pull shown as days old)."""
    digest = await _push(client, "v1")
    registry = client.server.app[REGISTRY_KEY]
    assert (await login(client)).status == 303
    db = registry.db
    read = db.read
    old = 1000.0

    async def read_then_flush(fn: Any, *args: Any, **kwargs: Any) -> Any:
        out = await read(fn, *args, **kwargs)
        await registry.flush_access()  # the write lands after the read's snapshot
        return out

    async def served_then(path: str) -> Any:
        await registry.flush_access()

        def long_ago(ix: Index) -> None:
            ix.db.execute("UPDATE repos SET last_access = ?", (old,))
            ix.db.execute("UPDATE repo_manifests SET last_access = ?", (old,))

        await db.write(long_ago)
        resp = await client.get(f"/v2/{REPO}/manifests/{digest}", headers=basic("alice", PASSWORD))
        assert resp.status == 200
        assert registry.unflushed_access()
        db.read = read_then_flush
        try:
            resp = await client.get(path)
            assert resp.status == 200
            return await resp.json()
        finally:
            del db.read

    repos = await served_then("/ui/api/repositories")
    assert [r["last_pulled"] > old for r in repos["repositories"]] == [True]
    tags = await served_then(f"/ui/api/repositories/{REPO}/tags")
    assert tags["repository"]["last_pulled"] > old
    assert [t["last_pulled"] > old for t in tags["tags"]] == [True]
    manifest = await served_then(f"/ui/api/manifests/{REPO}@{digest}")
    assert manifest["last_pulled"] > old
