"""The peer marker (``Regproxy-Peer``) is a client's word: it earns no way around a rule a
client is held to. In process, with a fake upstream: the signature policy holds for peer-marked
manifest requests (``1`` and ``fetch``), a peer's local-only look does not deny normal clients
for what it could not fetch, and a ``fetch`` mark makes nothing dial an upstream that sync,
the config or the login would not let a client reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp.test_utils import TestClient, TestServer

from regproxy.app import create_app
from regproxy.config import config_from_dict
from regproxy.web_keys import POLICY_KEY
from tests.fakes import Clock, FakeUpstream
from tests.images import make_image
from tests.signing import make_key, simple_signature_manifest

pytestmark = pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": OCI_MANIFEST}
MARKS = ("1", "fetch", "yes")


def add_image(up: FakeUpstream, tag: str) -> str:
    img = make_image()
    for blob in (img.config, *img.layers):
        up.add_blob(blob)
    return up.add_manifest("team/app", tag, img.manifest, OCI_MANIFEST)


def add_signature(up: FakeUpstream, digest: str, key: Any) -> None:
    manifest, blobs = simple_signature_manifest(digest, key)
    for data in blobs.values():
        up.add_blob(data)
    up.add_manifest("team/app", f"sha256-{digest[7:]}.sig", manifest, OCI_MANIFEST)


async def start(raw: dict[str, Any]) -> tuple[TestClient[Any, Any], Clock]:
    app = create_app(config_from_dict(raw))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    clock = Clock()
    app[POLICY_KEY].clock = clock
    app[POLICY_KEY].registry.referrer_index.clock = clock
    return client, clock


async def ask(
    client: TestClient[Any, Any], path: str, mark: str | None = None, method: str = "GET"
) -> tuple[int, bytes]:
    headers = dict(ACCEPT)
    if mark is not None:
        headers["Regproxy-Peer"] = mark
    resp = await client.request(method, path, headers=headers)
    return resp.status, await resp.read()


async def test_a_peer_marked_request_is_held_to_the_signature_policy(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    key = make_key()
    pub = key.write_public(tmp_path / "k.pub")
    unsigned = add_image(upstream, "unsigned")
    signed = add_image(upstream, "signed")
    add_signature(upstream, signed, key)
    late = add_image(upstream, "late")
    client, clock = await start(
        {
            "storage": {"root": str(tmp_path / "store")},
            "tag_ttl": "60s",
            "log": {"access": False},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
            "policy": {
                "rules": [{"match": "fake.test/team/*", "require": "sigstore", "keys": [str(pub)]}]
            },
        }
    )
    base = "/v2/fake.test/team/app/manifests"
    try:
        # a normal pull stores the unsigned image's manifest and is refused
        assert (await ask(client, f"{base}/unsigned"))[0] == 403
        assert (await ask(client, f"{base}/{unsigned}"))[0] == 403
        # the hostile client marks itself a peer: still refused, by tag and by digest, GET and HEAD
        for mark in MARKS:
            for ref in ("unsigned", unsigned):
                for method in ("GET", "HEAD"):
                    status, body = await ask(client, f"{base}/{ref}", mark, method)
                    assert status == 403, (mark, ref, method)
                    assert b'"schemaVersion"' not in body  # nothing of the manifest served

        # a signed image stays what peers serve each other (its signature is held here)
        assert (await ask(client, f"{base}/signed"))[0] == 200
        assert (await ask(client, f"{base}/{signed}", "1"))[0] == 200
        assert (await ask(client, f"{base}/{signed}", "fetch"))[0] == 200

        # a peer's local-only look does not deny normal clients for what it could not fetch:
        # ``late`` is held here, its signature lands upstream after the denial expired ...
        assert (await ask(client, f"{base}/late"))[0] == 403
        add_signature(upstream, late, key)
        clock.now += 61
        # ... a lookup (which fetches nothing) finds no signature here: refused ...
        assert (await ask(client, f"{base}/{late}", "1"))[0] == 403
        assert upstream.count("GET", f"sha256-{late[7:]}.sig") == 1  # only the first pull's
        # ... and the next client fetches it and is served
        assert (await ask(client, f"{base}/{late}"))[0] == 200
        assert (await ask(client, f"{base}/{late}", "1"))[0] == 200
    finally:
        await client.close()


async def test_a_fetch_mark_dials_no_upstream_a_client_could_not_reach(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    add_image(upstream, "v1")
    ns = f"?ns={upstream.hostport}"
    # sync disabled: the fetch mark makes the host dial nothing
    client, _ = await start(
        {
            "storage": {"root": str(tmp_path / "off")},
            "content": {"sync": {"enable": False}},
            "log": {"access": False},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
        }
    )
    try:
        for mark in MARKS:
            assert (await ask(client, "/v2/fake.test/team/app/manifests/v1", mark))[0] == 404
            assert (await ask(client, f"/v2/team/app/manifests/v1{ns}", mark))[0] == 404
    finally:
        await client.close()
    # a host no upstream entry names is never dialled (the fake upstream is not configured)
    client, _ = await start(
        {"storage": {"root": str(tmp_path / "unnamed")}, "log": {"access": False}}
    )
    try:
        for mark in MARKS:
            status, body = await ask(client, f"/v2/team/app/manifests/v1{ns}", mark)
            assert status == 404 and b"NAME_UNKNOWN" in body, body
    finally:
        await client.close()
    assert upstream.count("", "/v2/") == 0
    # anonymous pulls off: the marks earn no read without a login
    hashed = bcrypt.hashpw(b"secret-password", bcrypt.gensalt(rounds=4)).decode()
    client, _ = await start(
        {
            "storage": {"root": str(tmp_path / "auth")},
            "log": {"access": False},
            "auth": {"anonymous_pull": False, "users": {"alice": hashed}},
            "upstreams": {upstream.hostport: {"url": upstream.url, "alias": "fake.test"}},
        }
    )
    try:
        for mark in MARKS:
            status, _ = await ask(client, "/v2/fake.test/team/app/manifests/v1", mark)
            assert status == 401
    finally:
        await client.close()
    assert upstream.count("", "/v2/") == 0
