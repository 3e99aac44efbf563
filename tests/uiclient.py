"""An in-process daemon for the web page's tests: log in, push, read the page's JSON."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
from aiohttp.test_utils import TestClient

from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.deadline import DEFAULT_TIMING, Timing
from tests.images import OCI_INDEX, OCI_MANIFEST, Image, sha256
from tests.inproc import DaemonServer

PASSWORD = "s3cret-Pass"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
AUTH = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}


async def start(
    root: Path, *, server_port: int = 0, timing: Timing = DEFAULT_TIMING, **extra: Any
) -> TestClient[Any, Any]:
    raw: dict[str, Any] = {
        "content": {"sync": {"enable": False}},
        "log": {"access": False},
        "auth": {"users": {"alice": HASH}},
        **extra,
    }
    raw["storage"] = {**extra.get("storage", {}), "root": str(root)}  # never the default root
    client: TestClient[Any, Any] = TestClient(
        DaemonServer(
            create_app(config_from_dict(raw), timing=timing), host="127.0.0.1", port=server_port
        )
    )
    await client.start_server()
    return client


async def login(client: TestClient[Any, Any]) -> str:
    """Log in as alice; the session's CSRF token."""
    page = await client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', await page.text())
    assert token is not None
    resp = await client.post(
        "/ui/login",
        data={"username": "alice", "password": PASSWORD, "login_token": token[1], "next": "/ui/"},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    m = re.search(r'name="csrf" value="([^"]+)"', await (await client.get("/ui/")).text())
    assert m is not None
    return m[1]


async def push(client: TestClient[Any, Any], repo: str, tag: str, img: Image) -> str:
    """Push as a client does: HEAD each blob first (it is missing), upload it, PUT the manifest."""
    for blob in (img.config, *img.layers):
        head = await client.head(f"/v2/{repo}/blobs/{sha256(blob)}", headers=AUTH)
        if head.status == 200:
            continue
        assert head.status == 404, head.status
        resp = await client.post(
            f"/v2/{repo}/blobs/uploads/?digest={sha256(blob)}", data=blob, headers=AUTH
        )
        assert resp.status == 201, await resp.text()
    return await put_manifest(client, repo, tag, img.manifest, OCI_MANIFEST)


async def put_manifest(
    client: TestClient[Any, Any], repo: str, ref: str, body: bytes, media_type: str = OCI_INDEX
) -> str:
    resp = await client.put(
        f"/v2/{repo}/manifests/{ref}", data=body, headers={"Content-Type": media_type, **AUTH}
    )
    assert resp.status == 201, await resp.text()
    return sha256(body)


async def get_json(client: TestClient[Any, Any], path: str) -> Any:
    resp = await client.get(path)
    assert resp.status == 200, (path, resp.status, await resp.text())
    return await resp.json()


async def post(client: TestClient[Any, Any], path: str, **form: str) -> aiohttp.ClientResponse:
    return await client.post(path, data=form)
